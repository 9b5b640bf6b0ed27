"""Pure-PyTorch references: the CPU fallback of every op and the oracle of its tests."""
