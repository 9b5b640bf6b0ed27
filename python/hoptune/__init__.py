"""hoptune: Hopper-native LLM post-training.

``import hoptune`` is lean: it imports neither torch nor transformers, creates no CUDA context and
compiles nothing; the entry points below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily)
_LAZY = {
    "quantize_nf4": "hoptune.quant",
    "dequantize_nf4": "hoptune.quant",
    "NF4Weight": "hoptune.quant",
    "kernels_available": "hoptune._lib",
    "LoRALinear": "hoptune.nn",
    "apply_lora": "hoptune.patch",
    "remove_lora": "hoptune.patch",
    "merge_and_unload": "hoptune.patch",
    "disable_adapters": "hoptune.patch",
    "fuse_decoder_ops": "hoptune.fusion",
    "unfuse_decoder_ops": "hoptune.fusion",
    "load_model": "hoptune.loading",
    "save_adapter": "hoptune.adapters",
    "load_adapter": "hoptune.adapters",
    "plan": "hoptune.plan",
}


# subpackages reachable as attributes after a bare ``import hoptune`` (``hoptune.quant.save_pretrained_nf4``,
# ``hoptune.ops.rms_norm``), imported on first use like the names above ("plan" is the function)
_SUBMODULES = frozenset(
    {
        "adapters",
        "config",
        "data",
        "fusion",
        "loading",
        "losses",
        "models",
        "nn",
        "ops",
        "patch",
        "quant",
        "train",
    }
)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        if name in _SUBMODULES:
            return importlib.import_module(f"hoptune.{name}")  # (the import sets the attribute)
        raise AttributeError(f"module 'hoptune' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})  # (a name already loaded is in both)
