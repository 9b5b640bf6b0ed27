"""Refuses a torch below pyproject's floor with one clear error, before the ops are registered:
before 2.7, torch.library's custom_op refuses their ``list[int]`` annotations with a schema error
from inside torch."""

from __future__ import annotations

import re

import torch

FLOOR = (2, 7)


def check(version: str) -> None:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) < FLOOR:
        raise ImportError(
            f"hoptune needs torch >= {FLOOR[0]}.{FLOOR[1]}; this is torch {version}: upgrade torch"
        )


check(torch.__version__)
