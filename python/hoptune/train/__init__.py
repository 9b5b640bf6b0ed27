"""Trainers: flat recipes (``sft.py``) over the shared pieces in ``loop.py``."""
