"""LoRALinear and NF4Linear as modules: state dicts, PEFT's DoRA forms, argument checks, weight
tying, a trainable bias."""

from __future__ import annotations

import contextlib
import copy
import io
import re

import pytest
import torch
from torch import nn

import hoptune
from hoptune.nn import LoRALinear, NF4Linear
from hoptune.ops import nf4_lora_linear
from hoptune.quant import quantize_nf4
from tests.conftest import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# the two layers that hold an NF4 weight, each built from a dense nn.Linear
_NF4_LAYERS = pytest.mark.parametrize(
    "make",
    [
        NF4Linear.from_linear,
        lambda lin: LoRALinear(lin, r=4, quantize="nf4", init_lora_weights=False),
    ],
    ids=["nf4_linear", "lora_linear"],
)


def _nf4_pair(make):
    """Two layers of the same shape whose double-quantized weights differ in scale (and so in the
    double quantization's offset)."""
    lin_a, lin_b = nn.Linear(256, 128), nn.Linear(256, 128)
    with torch.no_grad():
        lin_b.weight.mul_(3)
    return make(lin_a), make(lin_b)


@_NF4_LAYERS
def test_nf4_state_dict_round_trip(make):
    """The state dict carries the whole NF4 weight (the offset too): loading it into a layer
    quantized from other weights gives exactly the source's weights and outputs."""
    a, b = _nf4_pair(make)
    assert a._nf4_meta[3] != b._nf4_meta[3]
    sd = a.state_dict()
    assert "weight_nf4_meta" in sd and sd["weight_nf4_meta"].dtype == torch.float64
    b.load_state_dict(sd)
    base = (lambda m: m.dequantize()) if isinstance(a, NF4Linear) else (lambda m: m.base_weight())
    assert torch.equal(base(b), base(a))
    x = torch.randn(5, 256)
    assert torch.equal(b(x), a(x))
    # through a file, as a user would save it
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = make(nn.Linear(256, 128))
    c.load_state_dict(torch.load(buf))
    assert torch.equal(c(x), a(x))


def test_strict_loading_reports_the_nf4_metadata_entry_missing_or_unexpected():
    # a double-quantized layer needs the entry (its offset): strict loading of a state dict without
    # its NF4 entries names it with them; a layer with a dense base has no such entry to take
    a, _ = _nf4_pair(NF4Linear.from_linear)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"weight_nf4_meta\""):
        a.load_state_dict({"bias": a.bias.detach().clone()})
    q = _nf4_pair(lambda lin: LoRALinear(lin, r=4, quantize="nf4"))[0]
    dense = LoRALinear(nn.Linear(256, 128), r=4)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*\"weight_nf4_meta\""):
        dense.load_state_dict({**dense.state_dict(), "weight_nf4_meta": q.state_dict()["weight_nf4_meta"]})
    dense.load_state_dict(
        {**dense.state_dict(), "weight_nf4_meta": q.state_dict()["weight_nf4_meta"]}, strict=False
    )


def test_nf4_linear_takes_a_2d_weight_and_a_bias_of_its_rows():
    with pytest.raises(
        ValueError, match=r"weight must be a 2-D \[out, in\] NF4Weight, got shape \(2, 4, 64\)"
    ):
        NF4Linear(quantize_nf4(torch.randn(2, 4, 64)))
    with pytest.raises(ValueError, match=r"base must be a 2-D \[out, in\] NF4Weight, got shape \(2, 4, 64\)"):
        LoRALinear(quantize_nf4(torch.randn(2, 4, 64)), r=2)
    q = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(4,\), got \(64,\)"):
        NF4Linear(q, torch.randn(64))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(4,\), got list"):
        NF4Linear(q, [0.0] * 4)


def test_to_linear_gives_a_frozen_layer_of_the_same_function():
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and not any(p.requires_grad for p in lin.parameters())
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), layer(x))


def test_nf4_state_dict_without_meta_is_refused():
    """A state dict without the metadata (saved before it existed) cannot say which offset its
    double-quantized statistics need: refused before anything is copied, strict or not. Before,
    strict loading copied the codes and then reported the key as missing, and strict=False loaded
    them decoded with the layer's old offset (other weights, without a word)."""
    a, b = _nf4_pair(NF4Linear.from_linear)
    sd = a.state_dict()
    del sd["weight_nf4_meta"]
    before = b.dequantize()
    for strict in (True, False):
        with pytest.raises(
            RuntimeError, match="weight_nf4_meta: missing, and the state dict holds this double-quantized"
        ):
            b.load_state_dict(sd, strict=strict)
        assert torch.equal(b.dequantize(), before)
    # a state dict without this layer's NF4 buffers (other entries only) has no codes to decode
    b.load_state_dict({"bias": a.bias.detach().clone()}, strict=False)
    assert torch.equal(b.dequantize(), before) and torch.equal(b.bias, a.bias)
    # without double quantization there is no offset to lose
    single = [NF4Linear(quantize_nf4(torch.randn(64, 128), double_quant=False)) for _ in range(2)]
    sd = single[0].state_dict()
    del sd["weight_nf4_meta"]
    single[1].load_state_dict(sd)
    assert torch.equal(single[1].dequantize(), single[0].dequantize())


def test_nf4_state_dict_other_blocksize_is_refused():
    a = NF4Linear.from_linear(nn.Linear(256, 128), blocksize=64)
    b = NF4Linear.from_linear(nn.Linear(256, 128), blocksize=64)
    sd = a.state_dict()
    sd["weight_nf4_meta"] = torch.tensor([sd["weight_nf4_meta"][0].item(), 128.0, 256.0], dtype=torch.float64)
    before = b.dequantize()
    with pytest.raises(RuntimeError, match="blocksize 128"):
        b.load_state_dict(sd)
    # refused before anything is copied: not the source's codes decoded with this layer's offset
    assert torch.equal(b.dequantize(), before)
    sd["weight_nf4_meta"] = torch.tensor([0.0, 64.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected 5 values"):
        b.load_state_dict(sd)
    assert torch.equal(b.dequantize(), before)


@pytest.mark.parametrize("bias", [False, True])
def test_nf4_state_dict_of_another_shape_is_refused(bias):
    """A weight [out, in] and one [in, out] (or any other shape of as many elements) have NF4
    buffers of the same sizes: as nn.Linear does, loading refuses the other shape, and the layer
    keeps its own weight."""
    a = NF4Linear.from_linear(nn.Linear(256, 128, bias=bias))
    for lin in (nn.Linear(128, 256, bias=bias), nn.Linear(512, 64, bias=bias)):
        b = NF4Linear.from_linear(lin)
        before = b.dequantize()
        sd = {k: v for k, v in a.state_dict().items() if k != "bias"}
        with pytest.raises(RuntimeError, match=r"shape \(128, 256\), this module's"):
            b.load_state_dict(sd, strict=False)
        assert torch.equal(b.dequantize(), before)
    # the same shape loads
    c = NF4Linear.from_linear(nn.Linear(256, 128, bias=bias))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.dequantize(), a.dequantize())


def test_nf4_state_dict_meta_without_shape_still_loads():
    """A state dict saved before the entry held the shape (offset, blocksize, blocksize2 only)."""
    a, b = _nf4_pair(NF4Linear.from_linear)
    sd = a.state_dict()
    sd["weight_nf4_meta"] = sd["weight_nf4_meta"][:3]
    b.load_state_dict(sd)
    assert torch.equal(b.dequantize(), a.dequantize())


def test_nf4_state_dict_meta_without_shape_of_another_size_is_refused():
    """An old entry without the shape cannot say the weight's shape: NF4 buffers of another size
    are refused before anything is copied, and the layer keeps its own offset (a caller that
    catches the error and goes on has the weights it had)."""
    a = NF4Linear.from_linear(nn.Linear(512, 128))
    lin = nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.mul_(3)
    b = NF4Linear.from_linear(lin)
    sd = a.state_dict()
    sd["weight_nf4_meta"] = sd["weight_nf4_meta"][:3]
    before, bias = b.dequantize(), b.bias.clone()
    with pytest.raises(RuntimeError, match=r"NF4 buffers of other sizes \(weight_packed: .* \(32768,\)"):
        b.load_state_dict(sd)
    assert torch.equal(b.dequantize(), before)
    assert torch.equal(b.bias, bias)


@_NF4_LAYERS
def test_nf4_state_dict_meta_without_shape_of_the_transpose_is_refused(make):
    """An old entry without the shape cannot tell [128, 256] from [256, 128] (NF4 buffers of the
    same sizes), but the bias (and the adapter) can: every entry's shape is checked before anything
    is copied, so the refused load leaves the layer's weight, offset and bias as they were."""
    a = make(nn.Linear(256, 128))
    lin = nn.Linear(128, 256)
    with torch.no_grad():
        lin.weight.mul_(3)
    b = make(lin)
    sd = a.state_dict()
    sd["weight_nf4_meta"] = sd["weight_nf4_meta"][:3]
    before = {k: v.clone() for k, v in b.state_dict().items()}
    meta = b._nf4_meta
    with pytest.raises(RuntimeError, match=r"size mismatch for bias"):
        b.load_state_dict(sd)
    assert b._nf4_meta == meta
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


def _peft_dora_forward(lora: LoRALinear, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward with dropout output d: base(x) + (m/n - 1) d W^T + (m/n) s B A d."""
    w = lora.base_weight(torch.float32)
    n = torch.linalg.vector_norm(w + lora.lora_delta(), dim=1).detach()
    mn = lora.lora_magnitude / n
    y = x @ w.t() + (mn - 1) * (d @ w.t()) + mn * (lora.scaling * (d @ lora.lora_A.t()) @ lora.lora_B.t())
    return y if lora.bias is None else y + lora.bias


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_dora_with_dropout_is_peft_form(quantize):
    """With dropout active, DoRA computes PEFT's form (the base on x, the magnitude's correction and
    the LoRA term on the dropped-out x); in eval mode the dropout is off and both forms agree."""
    lora = LoRALinear(
        nn.Linear(128, 64), r=4, lora_dropout=0.5, use_dora=True, quantize=quantize, init_lora_weights=False
    )
    with torch.no_grad():
        lora.lora_magnitude.mul_(torch.rand(64) + 0.5)  # m != n: the correction term matters
    x = torch.randn(6, 128)
    lora.train()
    torch.manual_seed(1)
    y = lora(x)
    torch.manual_seed(1)
    d = lora.lora_dropout(x)
    assert rel_err(y, _peft_dora_forward(lora, x, d)) < 1e-5
    lora.eval()
    assert rel_err(lora(x), _peft_dora_forward(lora, x, x)) < 1e-5


def test_dora_matches_peft_with_dropout():
    """The same weights in PEFT's DoRA layer and ours, dropout active, the same RNG state: the
    same output and gradients."""
    import peft

    base = nn.Sequential()
    base.add_module("proj", nn.Linear(96, 48))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True, target_modules=["proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).base_model.model.proj
    ours = copy.deepcopy(base)
    hoptune.apply_lora(ours, r=4, alpha=8, dropout=0.3, use_dora=True, target_modules=["proj"])
    ours = ours.proj
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight * 1.3)
        theirs.lora_magnitude_vector["default"].weight.mul_(1.3)
    ours.train()
    theirs.train()
    x = torch.randn(5, 96)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    torch.manual_seed(7)
    y_ours = ours(x)
    assert rel_err(y_ours, y_theirs) < 1e-5
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for g_ours, g_theirs in (
        (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
        (ours.lora_B.grad, theirs.lora_B["default"].weight.grad),
        (ours.lora_magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad),
    ):
        assert rel_err(g_ours, g_theirs) < 1e-4


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_in_autocast_gives_the_autocast_dtype(quantize, dropout):
    """A float32 DoRA layer inside torch.autocast returns bf16, as its LoRA twin and PEFT's DoRA
    layer do (it returned float32: twice the activation memory of the layer's output), within
    twice PEFT's error there."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(256, 192))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, use_dora=True, target_modules=["proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).base_model.model.proj
    ours = hoptune.apply_lora(
        copy.deepcopy(base), r=8, alpha=16, dropout=dropout, use_dora=True, target_modules=["proj"]
    ).proj
    if quantize:  # (PEFT's layer gets the dequantized weight: the same base)
        ours = LoRALinear(
            nn.Linear(256, 192), r=8, lora_alpha=16, lora_dropout=dropout, use_dora=True, quantize="nf4"
        )
        with torch.no_grad():
            theirs.base_layer.weight.copy_(ours.base_weight(torch.float32))
            theirs.base_layer.bias.copy_(ours.bias)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        theirs.lora_magnitude_vector["default"].weight.mul_(1.3)
        ours.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)
    x = torch.randn(64, 256)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        torch.manual_seed(1)
        want = ours(x).double()
        outs = []
        for layer in (ours, theirs):
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(layer(x))
        assert outs[0].dtype == outs[1].dtype == torch.bfloat16, mode
        assert rel_err(outs[0], want) <= 2 * rel_err(outs[1], want) + 1e-6, mode


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_dora_init_with_random_b(quantize):
    """init_lora_weights=False (B random): the magnitude starts at ||W + s B A|| as in PEFT, so
    the DoRA layer starts out equal to the plain LoRA layer."""
    lin = nn.Linear(128, 64)
    dora = LoRALinear(lin, r=4, use_dora=True, quantize=quantize, init_lora_weights=False)
    w = dora.base_weight(torch.float32) + dora.lora_delta()
    assert rel_err(dora.lora_magnitude, torch.linalg.vector_norm(w, dim=1)) < 1e-6
    x = torch.randn(3, 128)
    plain = x @ w.t() + dora.bias
    assert rel_err(dora(x), plain) < 1e-5


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_dora_row_norms_over_several_chunks(quantize, monkeypatch):
    """The row norms are computed in chunks of rows (bounded memory): every row, across the chunks
    and in a last partial one, is that of the whole weight."""
    import hoptune.nn.lora as lora_mod

    monkeypatch.setattr(lora_mod, "_NORM_ROWS", 16)
    dora = LoRALinear(nn.Linear(128, 70), r=4, use_dora=True, quantize=quantize, init_lora_weights=False)
    w = dora.base_weight(torch.float32) + dora.lora_delta()
    assert rel_err(dora.weight_row_norms(), torch.linalg.vector_norm(w, dim=1)) < 1e-6
    assert (
        rel_err(
            dora.weight_row_norms(include_lora=False),
            torch.linalg.vector_norm(dora.base_weight(torch.float32), dim=1),
        )
        < 1e-6
    )


def test_gaussian_init():
    lora = LoRALinear(nn.Linear(512, 256), r=8, init_lora_weights="gaussian")
    assert not lora.lora_B.any()
    assert abs(lora.lora_A.std().item() - 1 / 8) < 0.01
    m = nn.Sequential(nn.Linear(64, 64))
    hoptune.apply_lora(m, r=4, target_modules=["0"], init_lora_weights="gaussian")
    assert abs(m[0].lora_A.std().item() - 1 / 4) < 0.05


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=True), "r must be a positive int"),
        (dict(lora_alpha="16"), "lora_alpha must be a finite number"),
        (dict(lora_dropout="0.1"), "lora_dropout must be a number"),
        (dict(use_dora="yes"), "use_dora must be True or False"),
        (dict(use_rslora=1), "use_rslora must be True or False"),
        (dict(quantize="nf4", double_quant="no"), "double_quant must be True or False"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be True, False or 'gaussian'"),
        (dict(adapter_dtype=torch.int64), "adapter_dtype must be a floating-point dtype"),
        (dict(adapter_dtype="float32"), "adapter_dtype must be a floating-point dtype"),
        # (a float8 adapter cannot even be initialized: uniform_ is not implemented for it)
        (dict(adapter_dtype=torch.float8_e4m3fn), "adapter_dtype must be .*float32 or float64"),
        (dict(lora_alpha=float("inf")), "lora_alpha must be a finite number, got inf"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number, got nan"),
        (dict(quantize="int8"), "quantize must be None or 'nf4', got 'int8'"),
        (dict(bias=torch.zeros(32)), "bias is taken from the nn.Linear; pass it only with an NF4Weight base"),
    ],
)
def test_lora_linear_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoRALinear(nn.Linear(64, 32), **kwargs)


def test_lora_linear_keeps_the_base_bias_frozen_and_says_where_its_weight_is():
    lin = nn.Linear(64, 32)
    dense = LoRALinear(lin, r=2)
    assert dense.bias is lin.bias and not dense.bias.requires_grad  # (the layer's own, not a copy)
    with pytest.raises(
        AttributeError,
        match=r"this LoRALinear has a dense base, so it has no \.weight_nf4; its weight is \.weight",
    ):
        getattr(dense, "weight_nf4")  # noqa: B009
    nf4 = LoRALinear(quantize_nf4(torch.randn(32, 64)), r=2, bias=torch.randn(32))
    assert not nf4.bias.requires_grad and [n for n, p in nf4.named_parameters() if p.requires_grad] == [
        "lora_A",
        "lora_B",
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dropout="0.1"), "dropout must be a number"),
        (dict(use_dora="yes"), "use_dora must be True or False"),
        (dict(init_lora_weights="gaussian "), "init_lora_weights must be"),
    ],
)
def test_apply_lora_bad_arguments(kwargs, match):
    m = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises((ValueError, TypeError), match=match):
        hoptune.apply_lora(m, r=4, target_modules=["0"], **kwargs)
    assert isinstance(m[0], nn.Linear)


def test_remove_lora_keeps_tied_weights():
    """lm_head tied to the embeddings stays tied through apply_lora and remove_lora (the LoRA
    layer keeps the layer's own Parameter), and a cast keeps one storage."""
    from tests.test_patch import tiny_model

    m = tiny_model("llama", tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    hoptune.apply_lora(m, r=4, target_modules=["lm_head", "q_proj"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    hoptune.remove_lora(m)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.embed_tokens.weight.requires_grad  # given back
    m.half()
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_remove_lora_reties_a_tied_head_that_nf4_kept_dense():
    """apply_lora(quantize="nf4") keeps a targeted tied lm_head dense (as transformers +
    bitsandbytes); remove_lora gives it back the embedding matrix (not a copy of its own,
    trainable although the embeddings were frozen)."""
    from tests.test_patch import ids, logits, tiny_model

    m = tiny_model("llama", tie_word_embeddings=True)
    emb = m.model.embed_tokens.weight
    emb.requires_grad_(False)
    want = logits(m, ids())
    hoptune.apply_lora(m, r=4, quantize="nf4", target_modules=["lm_head", "q_proj"])
    assert not m.lm_head.quantized and m.model.layers[0].self_attn.q_proj.quantized
    hoptune.remove_lora(m)
    assert m.lm_head.weight is emb and m.model.embed_tokens.weight is emb
    assert [
        n for n, p in m.named_parameters() if p.requires_grad and n.startswith(("lm_head", "model.embed"))
    ] == []
    assert type(m.model.layers[0].self_attn.q_proj) is nn.Linear  # untied: comes back dequantized
    torch.testing.assert_close(logits(m, ids()), want, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lora", [True, False])
def test_op_trains_a_bias(device, lora):
    """A bias that requires grad gets its gradient (the sum of dY over the tokens), with or
    without an adapter; the other gradients are unchanged."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 128, generator=g) * 0.1).to(dtype).to(device)
    q = quantize_nf4(w)
    x = torch.randn(2, 7, 128, generator=g).to(dtype).to(device).requires_grad_(True)
    a = (torch.randn(4, 128, generator=g) * 0.1).to(dtype).to(device).requires_grad_(lora)
    b = (torch.randn(96, 4, generator=g) * 0.1).to(dtype).to(device).requires_grad_(lora)
    bias = torch.randn(96, generator=g).to(dtype).to(device).requires_grad_(True)
    gy = torch.randn(2, 7, 96, generator=g).to(dtype).to(device)
    args = (a, b, 0.5) if lora else (None, None, 1.0)
    nf4_lora_linear(x, q, *args, bias=bias).backward(gy)
    expected = gy.double().sum((0, 1))
    low = gy.sum((0, 1))
    assert bias.grad is not None and bias.grad.dtype == dtype
    assert rel_err(bias.grad, expected) <= 2 * rel_err(low, expected) + 1e-6
    # the same call with the bias frozen: the same gradients for x and the adapter
    frozen = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, a, b)]
    fargs = (frozen[1], frozen[2], 0.5) if lora else (None, None, 1.0)
    nf4_lora_linear(frozen[0], q, *fargs, bias=bias.detach()).backward(gy)
    for name, t, f in zip(("dx", "dA", "dB"), (x, a, b), frozen):
        if t.requires_grad:
            assert f.grad is not None and rel_err(t.grad, f.grad) <= (0 if device == "cpu" else 1e-2), name
    # and through the layer, with the bias unfrozen by the user
    layer = NF4Linear(q, bias.detach().clone()).to(device)
    layer.bias.requires_grad_(True)
    layer(x.detach()).backward(gy)
    assert rel_err(layer.bias.grad, expected) <= 2 * rel_err(low, expected) + 1e-6


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_nf4_base_in_autocast(use_dora, dropout):
    """A float32 layer on an NF4 base inside torch.autocast (a bf16 training loop) computes like
    its dense twin there: the output, and gradients for x and the adapter."""
    torch.manual_seed(0)
    nf4 = LoRALinear(
        nn.Linear(128, 64),
        r=4,
        quantize="nf4",
        use_dora=use_dora,
        lora_dropout=dropout,
        init_lora_weights=False,
    )
    dense = LoRALinear(nn.Linear(128, 64), r=4, use_dora=use_dora, lora_dropout=dropout)
    dense.load_state_dict(
        {k: v for k, v in nf4.state_dict().items() if not k.startswith("weight_")}, strict=False
    )
    with torch.no_grad():
        dense.weight.copy_(nf4.base_weight(torch.float32))
    x = torch.randn(2, 5, 128)
    outs = []
    for layer in (nf4, dense):
        x_ = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x_)
        y.float().square().sum().backward()
        outs.append((y, x_.grad, layer.lora_A.grad, layer.lora_B.grad))
    for name, o, d in zip(("y", "dx", "dA", "dB"), *outs):
        assert o.dtype == d.dtype, name
        assert rel_err(o, d) < 2e-2, name


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_dora_norms_inside_autocast_are_computed_in_fp32(quantize):
    """DoRA's ||W + s B A|| inside torch.autocast is the fp32 value computed outside it (autocast
    would run B @ A in bf16), and the layer's forward there leaves the adapter its gradients: the
    norms' cast of A, made under no_grad, was cached by autocast before torch 2.10 and reused by
    the forward's products, which then gave A no gradient at all."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(128, 64), r=4, quantize=quantize, use_dora=True, init_lora_weights=False)
    want = layer.weight_row_norms()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.weight_row_norms()
        y = layer(torch.randn(3, 128))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    y.float().square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_lora_linear_nf4_base_with_a_bias_of_another_shape():
    q = quantize_nf4(torch.randn(32, 64))
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        LoRALinear(q, r=4, bias=torch.zeros(31))


def test_lora_linear_names_what_it_cannot_take():
    """quantize="nf4" on a layer built on the meta device (weights not loaded yet) or of a dtype
    NF4 does not take, and a bias that is not a tensor: errors that name the argument, not a
    failure inside quantize_nf4 or an AttributeError."""
    with pytest.raises(ValueError, match="base.weight is on the meta device"):
        LoRALinear(nn.Linear(128, 64, device="meta"), r=4, quantize="nf4")
    with pytest.raises(TypeError, match="base.weight is torch.float64"):
        LoRALinear(nn.Linear(128, 64, dtype=torch.float64), r=4, quantize="nf4")
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\) \(out_features\), got list"):
        LoRALinear(quantize_nf4(torch.randn(32, 64)), r=4, bias=[0.0] * 32)
    with pytest.raises(ValueError, match=r"base.weight has 50 elements .* multiple of blocksize=64"):
        LoRALinear(nn.Linear(10, 5), r=2, quantize="nf4")


def test_nf4_from_linear_names_what_it_cannot_quantize():
    """A layer built on the meta device (weights not loaded yet) or of a dtype NF4 does not take:
    an error that names the linear's weight and the way out, not a failure inside quantize_nf4."""
    with pytest.raises(ValueError, match="linear.weight is on the meta device"):
        NF4Linear.from_linear(nn.Linear(128, 64, device="meta"))
    with pytest.raises(TypeError, match=r"linear.weight is torch.float64.*dtype="):
        NF4Linear.from_linear(nn.Linear(128, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"linear.weight has 50 elements .* multiple of blocksize=64"):
        NF4Linear.from_linear(nn.Linear(10, 5))
    q = NF4Linear.from_linear(nn.Linear(128, 64, dtype=torch.float64), dtype=torch.float32)
    assert q.base_dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_from_linear_dtype_converts_the_bias_too(dtype):
    """from_linear(dtype=...) converts the layer as nn.Linear.to(dtype) would: the bias too, not
    only the weight; without a dtype the bias keeps the linear's."""
    lin = nn.Linear(128, 64)
    q = NF4Linear.from_linear(lin, dtype=dtype)
    assert q.base_dtype == dtype and q.bias.dtype == dtype
    assert torch.equal(q.bias, lin.bias.detach().to(dtype))
    assert NF4Linear.from_linear(lin).bias.dtype == torch.float32


@pytest.mark.parametrize("tensor", ["weight", "bias"])
def test_nf4_from_linear_dtype_that_cannot_hold_the_values(tensor):
    """A float32 value beyond float16's range (65504) is inf once converted to dtype=float16: the
    error names the dtype and the way out, not "inf or NaN ... check the checkpoint" (the checkpoint
    is fine), and an overflowing bias is not kept as inf."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        getattr(lin, tensor)[3] = 7e4 * (1 + torch.rand(()))
    with pytest.raises(
        ValueError, match=rf"linear.{tensor} holds values up to .*dtype=torch.float16.*bfloat16"
    ):
        NF4Linear.from_linear(lin, dtype=torch.float16)
    q = NF4Linear.from_linear(lin, dtype=torch.bfloat16)
    assert torch.isfinite(q.dequantize()).all() and torch.isfinite(q.bias).all()
    bad = nn.Linear(128, 64)
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")  # (inf in the linear itself: the checkpoint's fault)
    with pytest.raises(ValueError, match="inf or NaN"):
        NF4Linear.from_linear(bad, dtype=torch.float16)


# -- inputs and conversions: errors that name the argument ---------------------------------------
LAYERS = {
    "dense": lambda: LoRALinear(nn.Linear(64, 32), r=4, init_lora_weights=False),
    "dense_dora": lambda: LoRALinear(nn.Linear(64, 32), r=4, use_dora=True, init_lora_weights=False),
    "nf4": lambda: LoRALinear(nn.Linear(64, 32), r=4, quantize="nf4", init_lora_weights=False),
    "nf4_linear": lambda: NF4Linear.from_linear(nn.Linear(64, 32)),
}


@pytest.mark.parametrize(
    "layer, disabled",
    [(name, False) for name in LAYERS] + [(name, True) for name in LAYERS if name != "nf4_linear"],
    ids=lambda v: {False: "adapter", True: "disabled"}.get(v, v) if isinstance(v, bool) else v,
)
@pytest.mark.parametrize(
    "make_x, match",
    [
        (
            lambda: torch.ones(3, 64, dtype=torch.long),
            r"float32.* tensor with last dim in_features=64, got torch.int64",
        ),
        (lambda: torch.ones(3, 64, dtype=torch.bool), r"got torch.bool \(3, 64\)"),
        (lambda: torch.randn(3, 63), r"in_features=64, got torch.float32 \(3, 63\)"),
        (lambda: torch.tensor(1.0), r"in_features=64, got torch.float32 \(\)"),
        (lambda: [0.0] * 64, "in_features=64, got list"),
        (lambda: torch.randn(3, 64, device="meta"), "x is on meta but the layer's (NF4 )?weight is on cpu"),
    ],
    ids=["long", "bool", "last_dim", "0d", "list", "device"],
)
def test_layers_refuse_inputs_they_cannot_compute(layer, make_x, match, disabled):
    """Every layer, dense or NF4 base, adapter on or off, refuses an x of another dtype, width or
    device with an error naming x and what it expected: over a dense base an integer x would
    otherwise run against the weight cast to integers (a silently wrong result), and the rest fail
    deep inside torch."""
    mod = LAYERS[layer]()  # (an NF4Linear has no adapter to disable)
    with mod.disable_adapter() if disabled else contextlib.nullcontext():
        with pytest.raises(ValueError, match="x must be a |x is on") as e:
            mod(make_x())
    assert re.search(match, str(e.value)), str(e.value)


def test_dense_base_takes_float64():
    """Only NF4 limits x to the 16- and 32-bit floats: over a dense base a float64 x computes in
    float64 (nn.Linear's dtype rule, the base weight cast up)."""
    lora = LoRALinear(nn.Linear(64, 32).double(), r=4, init_lora_weights=False)
    x = torch.randn(3, 64, dtype=torch.float64)
    y = lora(x)
    assert y.dtype == torch.float64
    a, b = lora.lora_A.double(), lora.lora_B.double()
    assert rel_err(y, x @ lora.weight.t() + lora.bias + lora.scaling * (x @ a.t()) @ b.t()) < 1e-12
    with pytest.raises(ValueError, match="x must be a bfloat16/float16/float32 tensor"):
        LoRALinear(nn.Linear(64, 32), r=4, quantize="nf4")(x)


@pytest.mark.parametrize("grad", [True, False])
def test_lora_linear_refuses_a_parametrized_weight(grad):
    """A dense base whose weight a parametrization computes (weight_norm): an error naming it, as
    apply_lora gives, not "you can only change requires_grad flags of leaf variables" (nor, under
    no_grad, a layer holding the weight as a plain attribute, missing from its state dict and
    left behind by .to())."""
    from torch.nn.utils import parametrizations, parametrize

    lin = parametrizations.weight_norm(nn.Linear(64, 32))
    match = r"base\.weight .*not an nn.Parameter.*remove_parametrizations"
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
        LoRALinear(lin, r=4)
    w = lin.weight.detach().clone()
    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    lora = LoRALinear(lin, r=4)
    assert torch.equal(lora.state_dict()["weight"], w) and not lora.weight.requires_grad
    # (quantized, the computed weight is all that is kept: nothing to refuse)
    nf4 = LoRALinear(parametrizations.weight_norm(nn.Linear(64, 32)), r=4, quantize="nf4")
    assert "weight_packed" in nf4.state_dict()


@pytest.mark.parametrize("use_dora", [False, True])
def test_float64_base_merges_in_float64(use_dora):
    """A float64 dense base merges (and takes DoRA's row norms) in float64: a fresh adapter (B = 0)
    gives back the weight exactly, a trained one W + s B A to float64 precision (it was summed in
    float32: errors ~1e-7 on every element)."""
    lin = nn.Linear(64, 32).double()
    with torch.no_grad():
        lin.weight.normal_()  # (not the float32 values nn.Linear's init casts up)
    w = lin.weight.detach().clone()
    kw = dict(r=4, use_dora=use_dora, adapter_dtype=torch.float64)
    assert torch.equal(LoRALinear(lin, **kw).to_linear().weight, w)
    lora = LoRALinear(lin, **kw, init_lora_weights=False)
    want = w + lora.scaling * lora.lora_B @ lora.lora_A
    merged = lora.merged_weight()
    assert merged.dtype == torch.float64 and rel_err(merged, want) < 1e-14
    x = torch.randn(5, 64, dtype=torch.float64)
    assert rel_err(lora.to_linear()(x), lora(x)) < 1e-14


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_linear_conversions_refuse_other_dtypes(quantize):
    """merged_weight / base_weight / lora_delta / to_linear with an integer dtype (or a dtype's
    name): an error naming dtype, not a weight rounded to integers or 'Invalid device string'."""
    lora = LoRALinear(nn.Linear(64, 32), r=4, quantize=quantize, init_lora_weights=False)
    calls = {
        "merged_weight": lambda: lora.merged_weight(torch.int32),
        "base_weight": lambda: lora.base_weight(torch.int32),
        "lora_delta": lambda: lora.lora_delta(torch.int32),
        "to_linear": lambda: lora.to_linear(dtype=torch.int8),
        "to_linear(str)": lambda: lora.to_linear(dtype="bfloat16"),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="dtype must be"):
            call()
            pytest.fail(f"{name} took a dtype that is not a float")
    assert lora.merged_weight(torch.bfloat16).dtype == torch.bfloat16


def test_nf4_base_converts_to_float64():
    """Over an NF4 base, base_weight and to_linear(merge=False) give float64 as merged_weight and
    to_linear(merge=True) do (the float32 dequantization, exact in float64)."""
    lora = LoRALinear(nn.Linear(64, 32), r=4, quantize="nf4", init_lora_weights=False)
    w = lora.base_weight(torch.float64)
    assert w.dtype == torch.float64 and torch.equal(w, lora.base_weight(torch.float32).double())
    for merge in (False, True):
        lin = lora.to_linear(merge=merge, dtype=torch.float64)
        assert lin.weight.dtype == lin.bias.dtype == torch.float64
        expected = lora.merged_weight(torch.float64) if merge else w
        assert torch.equal(lin.weight, expected)


def test_nf4_linear_converts_to_float64():
    """NF4Linear's dequantize and to_linear give float64 as LoRALinear's base_weight and to_linear
    do over the same NF4 weight (the float32 dequantization, exact in float64); integers are
    still refused."""
    q = NF4Linear.from_linear(nn.Linear(64, 32))
    w = q.dequantize(torch.float64)
    assert w.dtype == torch.float64 and torch.equal(w, q.dequantize(torch.float32).double())
    lin = q.to_linear(torch.float64)
    assert lin.weight.dtype == lin.bias.dtype == torch.float64
    assert torch.equal(lin.weight, w) and torch.equal(lin.bias, q.bias.double())
    lora = LoRALinear(q.weight_nf4, r=4, bias=q.bias, init_lora_weights=False)
    assert torch.equal(w, lora.base_weight(torch.float64))
    for call in (lambda: q.dequantize(torch.int8), lambda: q.to_linear(torch.int8)):
        with pytest.raises(TypeError, match="dtype must be bfloat16, float16, float32 or float64"):
            call()


@pytest.mark.parametrize("layer", ["nf4", "nf4_linear"])
def test_nf4_buffers_follow_to_empty_and_share_memory(layer):
    """The NF4 buffers keep their dtypes through casts, but otherwise follow the module's _apply:
    to_empty() materializes a layer moved to meta (a copy out of meta would fail), and
    share_memory() shares them like every other tensor."""
    from hoptune.nn.nf4_linear import NF4_BUFFERS

    src = LAYERS[layer]()
    mod = copy.deepcopy(src).to("meta")
    mod.to_empty(device="cpu")
    for n in NF4_BUFFERS:
        assert getattr(mod, n).device.type == "cpu" and getattr(mod, n).dtype == getattr(src, n).dtype, n
    mod.load_state_dict(src.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(mod(x), src(x))
    src.share_memory()
    assert [n for n, t in src.named_buffers() if not t.is_shared()] == []


@pytest.mark.parametrize(
    "cls", [NF4Linear, lambda q, bias: LoRALinear(q, r=4, bias=bias)], ids=["nf4_linear", "lora"]
)
def test_nf4_layers_put_the_bias_with_the_weight(cls):
    """A bias given on another device than the NF4 weight is moved to it (as LoRALinear does), not
    left behind to fail in the first forward."""
    q = quantize_nf4(torch.randn(32, 64)).to("meta")
    layer = cls(q, bias=torch.zeros(32))
    assert layer.bias.device.type == "meta"
    assert layer(torch.randn(2, 64, device="meta")).shape == (2, 32)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_inside_autocast_is_still_fp32(use_dora):
    """merged_weight (merge_and_unload) and lora_delta compute in the dtype asked for, also when
    called inside an autocast block (the end of a training loop), which would round B @ A to bf16."""
    lora = LoRALinear(nn.Linear(256, 128), r=8, use_dora=use_dora, init_lora_weights=False)
    want_w, want_d = lora.merged_weight(torch.float32), lora.lora_delta()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lora.lora_delta(), want_d)
        assert torch.equal(lora.merged_weight(torch.float32), want_w)
        assert torch.equal(lora.to_linear(dtype=torch.float32).weight, want_w)


def _linear_holding(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear(64, 32) whose weight is ``weight``: what a quantized linear layer (bitsandbytes'
    Linear8bitLt: int8 codes [out, in]; Linear4bit: uint8 codes packed [out * in / 2, 1]) holds."""
    lin = nn.Linear(64, 32)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


@pytest.mark.parametrize(
    "weight, match",
    [
        (
            torch.full((32, 64), 100, dtype=torch.int8),
            r"base.weight is torch.int8 \(32, 64\).*floating-point",
        ),
        (torch.zeros(1024, 1, dtype=torch.uint8), r"base.weight is torch.uint8 \(1024, 1\).*floating-point"),
        (torch.zeros(64, 32), r"base.weight has shape \(64, 32\), expected \(32, 64\)"),
    ],
    ids=["int8_codes", "packed_codes", "other_shape"],
)
@pytest.mark.parametrize("make", ["lora", "nf4_from_linear"])
def test_layers_refuse_a_base_that_holds_no_linear_weight(weight, match, make):
    """A linear layer whose weight is not a float [out_features, in_features] tensor (a quantized
    layer's codes): an error naming the base's weight, not integer codes computed with as weights
    (silently wrong outputs), nor a shape error in the first forward. NF4Linear.from_linear with a
    dtype would have quantized the codes cast to floats."""
    if make == "lora":
        base, call = "base", lambda lin: LoRALinear(lin, r=4)
    else:
        base, call = "linear", lambda lin: NF4Linear.from_linear(lin, dtype=torch.float32)
    with pytest.raises((TypeError, ValueError), match=match.replace("base", base)):
        call(_linear_holding(weight))


@pytest.mark.parametrize("double_quant", [None, "no", 0])
def test_nf4_from_linear_double_quant_must_be_a_bool(double_quant):
    """As LoRALinear's: double_quant=None (apply_lora's "as the layers are") or a string is an error,
    not a single quantization (None, 0) or a double one ("no") chosen by the value's truth."""
    with pytest.raises(TypeError, match=f"double_quant must be True or False, got {double_quant!r}"):
        NF4Linear.from_linear(nn.Linear(128, 64), double_quant=double_quant)
    assert NF4Linear.from_linear(nn.Linear(128, 64), double_quant=False).weight_absmax2 is None


@pytest.mark.parametrize("use_dora", [False, True])
def test_repr_names_the_scaling(use_dora):
    """The layer's repr tells rsLoRA's scaling (alpha / sqrt(r)) from LoRA's (alpha / r), with DoRA
    too: two layers that scale their adapters differently do not print the same."""
    kind = "dora" if use_dora else "lora"
    reprs = {
        rs: repr(LoRALinear(nn.Linear(64, 32), r=4, lora_alpha=8, use_dora=use_dora, use_rslora=rs))
        for rs in (False, True)
    }
    assert f"{kind}(r=4, alpha=8" in reprs[False] and "rslora" not in reprs[False]
    assert "rslora" in reprs[True] and (kind == "lora" or "dora" in reprs[True])


@pytest.mark.parametrize("double_quant", [False, True])
def test_repr_of_an_nf4_base_names_double_quant(double_quant):
    """LoRALinear's repr tells a double-quantized NF4 base from a plain one, as NF4Linear's does
    (they hold the same weight and print the same nf4(...))."""
    lin = nn.Linear(128, 64)
    nf4 = NF4Linear.from_linear(lin, blocksize=128, double_quant=double_quant)
    lora = LoRALinear(lin, r=4, quantize="nf4", blocksize=128, double_quant=double_quant)
    wrapped = LoRALinear(nf4.weight_nf4, r=4)
    expected = "nf4(blocksize=128, double_quant)" if double_quant else "nf4(blocksize=128)"
    for layer in (nf4, lora, wrapped):
        assert expected in repr(layer), repr(layer)


@pytest.mark.parametrize("lora", [False, True])
def test_weight_of_an_nf4_layer_says_where_the_weight_is(lora):
    # code that computes with a layer's .weight directly (Mamba's dt_proj.weight @ ...) got
    # "'NF4Linear' object has no attribute 'weight'", which says neither why nor what to do; code
    # that reads only its dtype or device (HunYuan-MoE's router, the Mamba-2 mixers' fused-kernel
    # call) failed too, where transformers + bitsandbytes run: .weight answers those and refuses
    # the rest with the message
    from hoptune.nn import LoRALinear, NF4Linear

    layer = NF4Linear.from_linear(torch.nn.Linear(128, 64), dtype=torch.bfloat16)
    if lora:
        layer = LoRALinear(layer.weight_nf4, r=4, lora_alpha=8)
    w = layer.weight
    assert isinstance(w, torch.Tensor) and not isinstance(w, torch.nn.Parameter)
    assert (w.dtype, w.device, tuple(w.shape)) == (torch.bfloat16, torch.device("cpu"), (64, 128))
    assert not w.requires_grad
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    for use in (
        lambda: x @ w.T,
        lambda: torch.nn.functional.linear(x, w),
        lambda: w.float(),
        lambda: w.data,
        lambda: torch.cat([w, w]),
    ):
        with pytest.raises(RuntimeError, match=r"NF4.*(dequantize|base_weight)\(\).*skip_modules"):
            use()
    assert "weight" not in layer.state_dict()  # (nothing registered)
    dense = LoRALinear(torch.nn.Linear(128, 64), r=4, lora_alpha=8)
    assert dense.weight.shape == (64, 128)
    with pytest.raises(AttributeError, match="no_such"):
        layer.no_such  # noqa: B018


def test_a_failed_move_leaves_the_nf4_weight_in_the_layer():
    # (the NF4 buffers are taken out while the rest of the layer moves: a move that fails on the way,
    # as .cuda() without a GPU, must put them back)
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    before = layer.dequantize()

    def fails(t):
        raise RuntimeError("no such device")

    with pytest.raises(RuntimeError, match="no such device"):
        layer._apply(fails)
    assert torch.equal(layer.dequantize(), before)
