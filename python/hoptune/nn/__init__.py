"""Layers built from hoptune ops."""

from hoptune.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
