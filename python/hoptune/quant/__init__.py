"""NF4 quantization, bit-compatible with bitsandbytes, and its safetensors key format."""

from hoptune.quant.bnb_format import from_bnb_state_dict, is_bnb_quantized, to_bnb_state_dict
from hoptune.quant.checkpoint import bnb_quantization_config, save_pretrained_nf4
from hoptune.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4Weight",
    "bnb_quantization_config",
    "dequantize_nf4",
    "from_bnb_state_dict",
    "is_bnb_quantized",
    "quantize_nf4",
    "save_pretrained_nf4",
    "to_bnb_state_dict",
]
