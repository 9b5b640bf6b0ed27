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


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'hoptune' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})  # (a name already loaded is in both)
