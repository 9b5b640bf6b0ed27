import pytest
import torch

from hoptune.models.tiny import build_model, build_tokenizer

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return build_model(seed=0, **SMALL)
