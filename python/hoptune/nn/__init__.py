"""Layers built from hoptune ops."""

from hoptune.nn.lora import LoRALinear
from hoptune.nn.nf4_linear import NF4Linear

__all__ = ["LoRALinear", "NF4Linear"]
