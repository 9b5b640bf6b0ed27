"""hoptune ops (``torch.ops.hoptune.*``): torch.library custom ops with fake kernels and autograd.

Importing this package registers the ops; it creates no CUDA context.
"""

from hoptune.ops import _torch_floor  # noqa: F401  (first: a torch below the floor is refused)
from hoptune.ops.decoder import rms_norm, rope, silu_mul
from hoptune.ops.logprob import fused_linear_logprobs, token_logprobs
from hoptune.ops.nf4 import nf4_dequantize, nf4_quantize, nf4_quantize_nested
from hoptune.ops.nf4_lora import nf4_lora_linear

__all__ = [
    "fused_linear_logprobs",
    "nf4_dequantize",
    "nf4_lora_linear",
    "nf4_quantize",
    "nf4_quantize_nested",
    "rms_norm",
    "rope",
    "silu_mul",
    "token_logprobs",
]
