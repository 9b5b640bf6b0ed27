"""Shared test helpers: the visible skip of GPU tests, output poisoning, error reports."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    from hoptune import _lib

    reason = _lib.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("HOPTUNE_REQUIRE_GPU_TESTS") == "1" and any("gpu" in item.keywords for item in items):
        # (on the GPU machine a kernel that fails to load must not turn every gpu test into a skip)
        raise pytest.UsageError(f"HOPTUNE_REQUIRE_GPU_TESTS=1 but the gpu tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Every test draws from the global RNG seeded by its own name, so a test's random inputs do
    not depend on which tests ran before it (a selection or an order change cannot flip it)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# a tiny model small enough for CPU tests of data, losses and recipes
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)
# a transformers decoder config's sizes for the architecture tests (a 2-layer model, vocab 128)
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture
def tokenizer():
    from hoptune.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def small_model():
    from hoptune.models.tiny import build_model

    torch.manual_seed(0)
    return build_model(seed=0, **SMALL)


def poison_cuda_cache(nbytes: int = 1 << 30, device: str = "cuda") -> None:
    """Fill freed blocks of the caching allocator with NaN bytes so outputs a kernel forgets to
    write show up as NaN (torch.empty then hands these blocks out again)."""
    blocks = []
    size = nbytes
    while size >= (1 << 20):
        try:
            blocks.append(torch.full((size,), 0xFF, dtype=torch.uint8, device=device))
        except torch.OutOfMemoryError:
            break
        size //= 2
    del blocks


def report_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = ""
) -> None:
    """assert_close that prints the worst elements when it fails."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name}: NaN in the result ({int(torch.isnan(a).sum())} elements)"
    err = (a - e).abs() - (atol + rtol * e.abs())
    if (err > 0).any():
        flat = err.reshape(-1)
        worst = torch.topk(flat, min(5, flat.numel())).indices
        rows = [
            f"  idx {tuple(int(i) for i in torch.unravel_index(w, a.shape))}: got {a.reshape(-1)[w]:.6g} "
            f"expected {e.reshape(-1)[w]:.6g}"
            for w in worst
        ]
        raise AssertionError(
            f"{name}: {int((err > 0).sum())} of {a.numel()} elements outside atol={atol} rtol={rtol}\n"
            + "\n".join(rows)
        )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64."""
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def encoder_as_decoder(family: str, vocab: int = 128, layers: int = 2):
    """A tiny BERT-family causal LM (``is_decoder``): "bert" (BertLMHeadModel), "electra" (its
    embeddings 128 wide, its hidden states 64: its head projects them back) or "roberta"."""
    import transformers

    config_cls, model_cls = {
        "bert": (transformers.BertConfig, transformers.BertLMHeadModel),
        "electra": (transformers.ElectraConfig, transformers.ElectraForCausalLM),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForCausalLM),
    }[family]
    extra = {"embedding_size": 128} if family == "electra" else {}
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        is_decoder=True,
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(cfg).eval()
