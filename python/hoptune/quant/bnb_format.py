"""bitsandbytes / transformers safetensors keys for an NF4 weight (``FORMATS.md`` section 1).

For a quantized ``<name>.weight`` the checkpoint holds::

    <name>.weight                                   uint8 [n/2, 1]   packed codes
    <name>.weight.absmax                            fp32 [nb] (uint8 when nested)
    <name>.weight.quant_map                         fp32 [16]
    <name>.weight.nested_absmax                     fp32 [nb2]       (nested only)
    <name>.weight.nested_quant_map                  fp32 [256]       (nested only)
    <name>.weight.quant_state.bitsandbytes__nf4     uint8 UTF-8 JSON: quant_type, blocksize, dtype,
                                                    shape (+ nested_blocksize, nested_dtype, nested_offset)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from hoptune.quant.nf4 import BLOCKSIZES, FLOAT_DTYPES, NESTED_BLOCKSIZES, NF4Weight
from hoptune.reference.nf4 import nf4_code

QS_SUFFIX = ".quant_state.bitsandbytes__nf4"
BNB_BLOCKSIZE2 = 256  # the nested blocksize bitsandbytes writes and runs
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Where the states below come from: bitsandbytes' CPU inference path repacks a layer and its absmax
# in the weight's dtype (Linear4bit.support_avx512bf16_for_cpu); saving undoes only part of that.
_CPU_REPACKED = (
    "bitsandbytes saves such a state once its CPU inference path has repacked the layer, which hoptune "
    "does not read: quantize the dense weights again, or save before running the layer on the CPU"
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def to_bnb_state_dict(q: NF4Weight, key: str) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes/transformers store for weight ``key`` (e.g. ``"...q_proj.weight"``);
    a double-quantized ``q`` must have blocksize2=256, the only one bitsandbytes runs."""
    if not isinstance(q, NF4Weight):
        raise TypeError(
            f"q must be an NF4Weight (quantize_nf4(w) of a weight, or an NF4Linear's .weight_nf4), got "
            f"{type(q).__name__}"
        )
    meta: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": _dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    out = {
        key: q.packed.reshape(-1, 1),
        f"{key}.absmax": q.absmax,
        f"{key}.quant_map": nf4_code(q.device),
    }
    if q.nested:
        assert q.absmax2 is not None and q.code2 is not None
        # bitsandbytes reads another nested blocksize but its matmul_4bit (every Linear4bit
        # forward) raises NotImplementedError on it; re-nesting would change the weights
        if q.blocksize2 != BNB_BLOCKSIZE2:
            raise ValueError(
                f"q.blocksize2 must be {BNB_BLOCKSIZE2} for a bitsandbytes state (bitsandbytes "
                f"runs no other nested blocksize), got {q.blocksize2}: quantize with "
                f"blocksize2={BNB_BLOCKSIZE2}, or double_quant=False"
            )
        out[f"{key}.nested_absmax"] = q.absmax2
        out[f"{key}.nested_quant_map"] = q.code2.clone()
        meta.update(nested_blocksize=q.blocksize2, nested_dtype="float32", nested_offset=q.offset)
    raw = json.dumps(meta).encode("utf-8")
    out[key + QS_SUFFIX] = torch.tensor(list(raw), dtype=torch.uint8, device=q.device)
    return out


def is_bnb_quantized(state_dict: Mapping[str, torch.Tensor], key: str) -> bool:
    """Whether ``key`` is stored as a bitsandbytes 4-bit weight in ``state_dict``."""
    return any(f"{key}.quant_state.bitsandbytes__{t}" in state_dict for t in ("nf4", "fp4"))


def _need(state_dict: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state_dict:
        raise ValueError(f"bitsandbytes NF4 weight is missing the tensor {name!r}")
    t = state_dict[name]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name!r} must be a tensor, got {type(t).__name__}")
    return t


def _as_uint8(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    if t.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int16, torch.int32):
        return t.contiguous().reshape(-1).view(torch.uint8)  # quant_storage other than uint8
    raise TypeError(f"{name!r} must hold packed uint8 codes, got {t.dtype}")


def parse_quant_state(key: str, t: torch.Tensor) -> dict[str, object]:
    """Decode ``<key>.quant_state.bitsandbytes__nf4`` (UTF-8 JSON bytes) with clear errors."""
    name = key + QS_SUFFIX
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{name!r} must be a 1-D uint8 tensor of UTF-8 JSON, got {t.dtype} {tuple(t.shape)}")
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name!r} is not valid UTF-8 JSON ({e}); the checkpoint may be corrupted") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{name!r} must hold a JSON object, got {type(meta).__name__}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{name!r} lacks the field {field!r} (has {sorted(meta)})")
    return meta


def from_bnb_state_dict(state_dict: Mapping[str, torch.Tensor], key: str) -> NF4Weight:
    """Read weight ``key`` saved by bitsandbytes / transformers (or by :func:`to_bnb_state_dict`)."""
    if f"{key}.quant_state.bitsandbytes__fp4" in state_dict:
        raise ValueError(f"{key!r} is quantized as FP4; hoptune reads NF4 only")
    meta = parse_quant_state(key, _need(state_dict, key + QS_SUFFIX))
    qs = key + QS_SUFFIX
    if meta["quant_type"] != "nf4":
        raise ValueError(f"{qs!r}: quant_type must be 'nf4', got {meta['quant_type']!r}")
    blocksize = meta["blocksize"]
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"{qs!r}: blocksize {blocksize!r} is not supported; hoptune reads NF4 weights of blocksize "
            f"{', '.join(map(str, BLOCKSIZES))}: quantize the dense checkpoint again with one of those"
        )
    dtype = _DTYPE_NAMES.get(str(meta["dtype"]))
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{qs!r}: dtype must be one of {sorted(_DTYPE_NAMES)}, got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{qs!r}: shape must be a list of positive ints, got {shape!r}")
    n = math.prod(shape)
    # before the byte count: for an odd n bitsandbytes stores (n + 1) // 2 bytes, and a message
    # about a missing byte would call a valid file corrupted
    if n % blocksize:
        raise ValueError(
            f"{qs!r}: shape {shape} has {n} elements, not a multiple of blocksize {blocksize}; "
            "bitsandbytes stores such a weight with a partial last block, which hoptune does not read: "
            "quantize the dense checkpoint again (load_model keeps such a layer dense)"
        )
    packed = _as_uint8(key, _need(state_dict, key))
    if packed.numel() * 2 != n:
        raise ValueError(f"{key!r} holds {packed.numel()} bytes but shape {shape} needs {n // 2} (n/2)")
    nb = n // blocksize
    qmap = _need(state_dict, f"{key}.quant_map")
    if qmap.numel() != 16 or not torch.equal(qmap.float().cpu().reshape(-1), nf4_code()):
        raise ValueError(f"{key}.quant_map is not the NF4 code table; hoptune reads NF4 only")
    absmax = _need(state_dict, f"{key}.absmax").reshape(-1)
    if absmax.numel() != nb:
        raise ValueError(f"{key}.absmax has {absmax.numel()} values, expected {nb} (numel / blocksize)")
    if "nested_absmax" not in {k[len(key) + 1 :] for k in state_dict if k.startswith(key + ".")}:
        # double quantized but its nested absmax lost: say so, not that the uint8 absmax is no float32
        if "nested_offset" in meta:
            _need(state_dict, f"{key}.nested_absmax")
        if absmax.dtype != torch.float32:
            why = f" ({_CPU_REPACKED})" if absmax.is_floating_point() else ""
            raise ValueError(
                f"{key}.absmax must be float32 without double quantization, got {absmax.dtype}{why}"
            )
        return NF4Weight(packed, absmax, torch.Size(shape), dtype, blocksize)

    for field in ("nested_blocksize", "nested_dtype", "nested_offset"):
        if field not in meta:
            raise ValueError(f"{qs!r} lacks {field!r} although {key}.nested_absmax is present")
    # bitsandbytes decodes the nested absmax in nested_dtype and adds the offset in it before going
    # to fp32: read as float32, another dtype would give other weights than bitsandbytes does
    if meta["nested_dtype"] != "float32":
        raise ValueError(
            f"{qs!r}: nested_dtype must be 'float32', got {meta['nested_dtype']!r} ({_CPU_REPACKED})"
        )
    bs2 = meta["nested_blocksize"]
    if bs2 not in NESTED_BLOCKSIZES:
        raise ValueError(f"{qs!r}: nested_blocksize must be one of {NESTED_BLOCKSIZES}, got {bs2!r}")
    offset = meta["nested_offset"]
    if not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{qs!r}: nested_offset must be a finite number, got {offset!r}")
    if absmax.dtype != torch.uint8:
        raise ValueError(f"{key}.absmax must be uint8 codes with double quantization, got {absmax.dtype}")
    absmax2 = _need(state_dict, f"{key}.nested_absmax").reshape(-1)
    if absmax2.dtype != torch.float32 or absmax2.numel() != -(-nb // bs2):
        raise ValueError(
            f"{key}.nested_absmax must be float32 [{-(-nb // bs2)}], got {absmax2.dtype} {tuple(absmax2.shape)}"
        )
    code2 = _need(state_dict, f"{key}.nested_quant_map").reshape(-1)
    if code2.dtype != torch.float32 or code2.numel() != 256:
        raise ValueError(
            f"{key}.nested_quant_map must be float32 [256], got {code2.dtype} {tuple(code2.shape)}"
        )
    # The offset travels as JSON; bitsandbytes reads it back as an fp32 tensor.
    offset32 = float(torch.tensor(float(offset), dtype=torch.float32))
    return NF4Weight(packed, absmax, torch.Size(shape), dtype, blocksize, absmax2, code2, offset32, bs2)
