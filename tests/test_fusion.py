"""hoptune.fuse_decoder_ops: which modules it fuses (by their computation, not their names), that a
fused model computes what it did, and that unfuse_decoder_ops restores it."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import hoptune
from hoptune import fusion
from hoptune.ops import decoder as ops
from tests.conftest import TINY_DECODER, rel_err


def _model(kind: str, dtype=torch.float32, device="cpu", seed=0):
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**TINY_DECODER, head_dim=16))
    return model.to(device=device, dtype=dtype).train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(
    "kind,want",
    [
        ("llama", {"rms_norm": 5, "swiglu": 2, "rope": 2}),
        ("qwen3", {"rms_norm": 9, "swiglu": 2, "rope": 2}),  # (per-head q/k norms too)
        ("gemma", {"rms_norm": 0, "swiglu": 0, "rope": 2}),  # (1 + weight norm, GELU MLP: not Llama's)
    ],
)
def test_fuses_what_computes_as_llama_and_changes_nothing_on_cpu(kind, want):
    model = _model(kind)
    ids = torch.randint(3, TINY_DECODER["vocab_size"], (2, 9))
    loss0, grads0 = _loss_and_grads(model, ids)
    keys = list(model.state_dict())
    rng = torch.random.get_rng_state()
    assert hoptune.fuse_decoder_ops(model) == want
    assert torch.equal(rng, torch.random.get_rng_state()), "fusing drew from the global generator"
    assert list(model.state_dict()) == keys
    assert fusion.fused_counts(model) == want
    assert hoptune.fuse_decoder_ops(model) == want  # (again: nothing more)
    loss1, grads1 = _loss_and_grads(model, ids)
    # on a CPU the fused forwards run the model's own ops: the same numbers
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    assert hoptune.unfuse_decoder_ops(model) == sum(want.values())
    assert fusion.fused_counts(model) == dict.fromkeys(fusion.KINDS, 0)
    # (nothing of fusion's left on the modules: no forward, no marks)
    assert not [
        (n, a) for n, m in model.named_modules() for a in m.__dict__ if a == "forward" or "hoptune" in a
    ]
    loss2, _ = _loss_and_grads(model, ids)
    assert torch.equal(loss0, loss2)


def test_an_unfused_model_no_longer_runs_the_fused_rope(monkeypatch):
    model = _model("llama")
    hoptune.fuse_decoder_ops(model)
    hoptune.unfuse_decoder_ops(model)
    pymod = sys.modules[type(model).__module__]
    assert pymod.apply_rotary_pos_emb._hoptune_original is not None  # (the dispatcher stays)
    calls = []
    monkeypatch.setattr(ops, "rope_runs", lambda *a: True)
    monkeypatch.setattr(ops, "rope", lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)))
    assert not calls


def test_the_fused_ops_run_only_in_the_fused_model(monkeypatch):
    fused, other = _model("llama"), _model("llama", seed=1)
    hoptune.fuse_decoder_ops(fused)
    calls = {"rope": 0, "rms_norm": 0}
    for name in calls:
        # (as if the kernels ran here: on a CPU the fused forwards run the module's own)
        monkeypatch.setattr(ops, f"{name}_runs", lambda *a: True)

        def counting(*a, _name=name, **k):
            calls[_name] += 1
            return getattr(fusion.ref, _name)(*a, **k)

        monkeypatch.setattr(ops, name, counting)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        other(ids)
    assert calls == {"rope": 0, "rms_norm": 0}, "a model not passed to fuse_decoder_ops ran the fused ops"
    with torch.no_grad():
        fused(ids)
    assert calls["rope"] == 2 * 2 and calls["rms_norm"] == 5  # (q and k in each of 2 layers)
    hoptune.unfuse_decoder_ops(fused)


def test_an_instance_forward_set_by_someone_else_is_kept():
    model = _model("llama")
    norm = model.model.norm
    hooked = norm.forward
    norm.forward = lambda x: hooked(x)  # (as an offloading hook sets it)
    counts = hoptune.fuse_decoder_ops(model)
    assert (
        counts["rms_norm"] == 4
        and norm.__dict__["forward"] is not None
        and not hasattr(norm, "_hoptune_fused")
    )
    attn = model.model.layers[0].self_attn
    prev = attn.forward
    hoptune.unfuse_decoder_ops(model)
    hoptune.fuse_decoder_ops(model)
    assert attn.forward is not prev
    hoptune.unfuse_decoder_ops(model)
    # an attention layer's own instance forward, set before fusing, is wrapped and then given back
    own = attn.forward
    attn.forward = lambda *a, **k: own(*a, **k)
    mine = attn.forward
    assert hoptune.fuse_decoder_ops(model)["rope"] == 2 and attn.forward is not mine
    hoptune.unfuse_decoder_ops(model)
    assert attn.forward is mine


def test_deepcopy_of_a_fused_model_runs_its_own_modules():
    model = _model("llama")
    hoptune.fuse_decoder_ops(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        a, b = model(ids).logits, twin(ids).logits
    assert not torch.equal(a, b), "the copy's fused forwards ran the original's modules"
    assert twin.model.norm.forward.args[0] is twin.model.norm
    hoptune.unfuse_decoder_ops(model)
    hoptune.unfuse_decoder_ops(twin)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hoptune.fuse_decoder_ops("llama")
    with pytest.raises(TypeError, match="rope must be True or False"):
        hoptune.fuse_decoder_ops(_model("llama"), rope="yes")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hoptune.unfuse_decoder_ops(None)


def test_kinds_can_be_left_out():
    model = _model("llama")
    assert hoptune.fuse_decoder_ops(model, rope=False, swiglu=False) == {
        "rms_norm": 5,
        "swiglu": 0,
        "rope": 0,
    }
    hoptune.unfuse_decoder_ops(model)
    assert hoptune.fuse_decoder_ops(model, rms_norm=False) == {"rms_norm": 0, "swiglu": 2, "rope": 2}
    assert fusion.fused_counts(model)["rms_norm"] == 0
    hoptune.unfuse_decoder_ops(model)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fused_model_on_the_gpu_with_nf4_lora_and_checkpointing(kind):
    from hoptune.train import loop

    ids = torch.randint(3, 128, (2, 33), device="cuda")
    results = []
    for fuse in (False, True):
        model = _model(kind, torch.bfloat16, "cuda")
        torch.manual_seed(5)
        hoptune.apply_lora(model, r=8, alpha=16, target_modules="all-linear", quantize="nf4")
        if fuse:
            assert sum(hoptune.fuse_decoder_ops(model).values()) > 0
        loop.enable_gradient_checkpointing(model)
        results.append(_loss_and_grads(model, ids))
        if fuse:
            hoptune.unfuse_decoder_ops(model)
    (l0, g0), (l1, g1) = results
    assert g0.keys() == g1.keys() and g0
    # the norms' fp32 sums run in another order: the same numbers to bf16's last bits
    assert abs(float(l0) - float(l1)) < 1e-2 * abs(float(l0))
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 3e-2, n


def test_sft_config_fuses_by_default(tmp_path):
    from hoptune.config import SFTConfig
    from hoptune.models import build_model
    from hoptune.train import sft

    lines = []
    cfg = SFTConfig()
    cfg.model.quantize = None
    model = sft.prepare_model(build_model(), cfg, log=lines.append)
    assert fusion.fused_counts(model)["rms_norm"] > 0
    assert any(line.startswith("fused decoder ops: ") for line in lines)
    cfg.model.fuse_decoder_ops = False
    model = sft.prepare_model(build_model(), cfg)
    assert fusion.fused_counts(model) == dict.fromkeys(fusion.KINDS, 0)
    # a model fused by its caller (here: norms only) keeps that choice
    cfg.model.fuse_decoder_ops = True
    model = build_model()
    hoptune.fuse_decoder_ops(model, swiglu=False, rope=False)
    model = sft.prepare_model(model, cfg, passed_in=True)
    assert fusion.fused_counts(model)["swiglu"] == 0 and fusion.fused_counts(model)["rms_norm"] > 0


@pytest.mark.gpu
def test_fused_model_compiles():
    model = _model("llama", torch.bfloat16, "cuda").eval()
    hoptune.fuse_decoder_ops(model)
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    assert rel_err(compiled, eager) < 2e-2
    hoptune.unfuse_decoder_ops(model)


def _kernels_everywhere(monkeypatch) -> dict[str, int]:
    """The ops' kernel checks as on an H100 (dtypes, shapes) with the kernels' calls counted and
    run by the references: the fused forwards' choices, testable on a CPU."""
    from hoptune import _lib

    monkeypatch.setattr(_lib, "use_kernel", lambda t, op: True)
    calls = dict.fromkeys(("rms_norm", "silu_mul", "rope"), 0)
    for name in calls:

        def counting(*a, _name=name, **k):
            calls[_name] += 1
            return getattr(fusion.ref, _name)(*a, **k)

        monkeypatch.setattr(ops, name, counting)
    return calls


def test_olmo2_keeps_its_norm_and_its_float32_rotary_tables(monkeypatch):
    import transformers

    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY_DECODER)).to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        want = model(ids).logits
    # its norm rounds after the weight's product: equal to Llama's only while the weight is ones
    counts = hoptune.fuse_decoder_ops(model)
    assert counts["rms_norm"] == 0 and counts["swiglu"] == 2
    calls = _kernels_everywhere(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
    # its rotary tables are float32 with bf16 q and k: the model's own function runs
    assert calls["rope"] == 0 and calls["silu_mul"] == 2
    assert torch.equal(got, want)
    hoptune.unfuse_decoder_ops(model)


def _saved(model, path):
    torch.save(model, path)
    return path


class _GatedNorm(torch.nn.Module):
    """Llama's norm when gate is None (as Mamba2-style gated norms)."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states, gate=None):
        if gate is not None:
            hidden_states = hidden_states * torch.sigmoid(gate)
        return fusion.ref.rms_norm(hidden_states, self.weight, self.variance_epsilon)


class _MLP(torch.nn.Module):
    def __init__(self, n, tail):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(n, 2 * n), torch.nn.Linear(n, 2 * n)
        self.down_proj = torch.nn.Linear(2 * n, n)
        self.act_fn = torch.nn.SiLU()
        self.tail = tail

    def forward(self, x):
        g = self.act_fn(self.gate_proj(x))
        if self.tail == "clamp":
            g = g.clamp(max=50.0)
        y = self.down_proj(g * self.up_proj(x))
        return torch.nn.functional.dropout(y, 0.5, self.training) if self.tail == "dropout" else y


def test_a_norm_called_with_more_arguments_runs_its_own_forward(monkeypatch):
    model = torch.nn.Sequential(_GatedNorm(16)).to(torch.bfloat16)
    assert hoptune.fuse_decoder_ops(model)["rms_norm"] == 1
    calls = _kernels_everywhere(monkeypatch)
    x, gate = torch.randn(2, 16).bfloat16(), torch.randn(2, 16).bfloat16()
    assert torch.equal(model[0](x, gate=gate), model[0].__class__.forward(model[0], x, gate=gate))
    assert calls["rms_norm"] == 0
    model[0](x)
    assert calls["rms_norm"] == 1


@pytest.mark.parametrize("tail", ["clamp", "dropout"])
def test_an_mlp_that_is_not_swiglu_alone_is_left(tail):
    model = torch.nn.Sequential(_MLP(16, tail))
    assert hoptune.fuse_decoder_ops(model)["swiglu"] == 0
    assert hoptune.fuse_decoder_ops(torch.nn.Sequential(_MLP(16, None)))["swiglu"] == 1


def test_a_fused_model_pickles(tmp_path, monkeypatch):
    """A fused model, and any model of the classes of one, round-trips through torch.save. With the
    kernels package transformers makes apply_rotary_pos_emb a module, and kernels rebuilds each
    attention layer's copy of it as type(<the module's attribute>)(): the dispatcher installed as a
    plain function there made every such torch.load fail (fused, unfused, or never fused). The
    rotary dispatch still reaches hoptune's op, before and after (the op stood in for by its
    reference where no kernel runs)."""
    from hoptune.ops import decoder as ops
    from hoptune.reference import decoder as ref

    calls = []
    monkeypatch.setattr(ops, "rope_runs", lambda x, cos, sin: True)
    monkeypatch.setattr(ops, "rope", lambda *a: calls.append(1) or ref.rope(*a))
    other = _model("llama")
    model = _model("llama")
    hoptune.fuse_decoder_ops(model)
    torch.load(_saved(other, tmp_path / "plain.pt"), weights_only=False)  # (never fused)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert len(calls) == 2 * 2 * model.config.num_hidden_layers  # (q and k of each layer, twice)
    assert fusion.fused_counts(back) == fusion.fused_counts(model)
    assert hoptune.unfuse_decoder_ops(back) == 9


def test_unfuse_leaves_a_forward_wrapped_after_fusing():
    model = _model("llama")
    hoptune.fuse_decoder_ops(model)
    norm = model.model.norm
    fused = norm.forward
    norm.forward = lambda x: fused(x)  # (a hook put on after fusing)
    assert hoptune.unfuse_decoder_ops(model) == 8
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)))  # (the hook's forward still finds what it wraps)


def test_the_checks_hold_in_every_kernel_dtype():
    # OLMo2's norm agrees with Llama's in float32 and not in bf16: fused in float32 and then cast,
    # it would have run the kernel on bf16 inputs
    import transformers

    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY_DECODER))
    assert hoptune.fuse_decoder_ops(model)["rms_norm"] == 0


def test_a_rotary_function_that_agrees_in_float32_only_is_not_fused():
    # (OLMo2's way: the rotation in float32, then cast; its rounding differs in bf16 and fp16)
    from hoptune import fusion
    from hoptune.reference import decoder as ref

    def in_float32(q, k, cos, sin):
        return tuple(ref.rope(t.float(), cos.float(), sin.float()).to(t.dtype) for t in (q, k))

    def llama(q, k, cos, sin):
        return ref.rope(q, cos, sin), ref.rope(k, cos, sin)

    gen = torch.Generator().manual_seed(0)
    assert fusion._rope_function_matches(llama, gen)
    assert not fusion._rope_function_matches(in_float32, gen)


def test_a_meta_or_empty_weight_is_no_obstacle_and_no_proof():
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    # norms and the rotary function are checked on probes of their own; an MLP's projections
    # cannot run on the meta device, so it stays as it is
    assert hoptune.fuse_decoder_ops(model) == {"rms_norm": 5, "swiglu": 0, "rope": 2}
    norm = _GatedNorm(4)
    norm.weight = torch.nn.Parameter(torch.empty(0))  # (as ZeRO-3 leaves a partitioned weight)
    assert hoptune.fuse_decoder_ops(torch.nn.Sequential(norm))["rms_norm"] == 0


def test_the_checks_fire_no_hooks_of_the_model():
    model = _model("llama")
    calls = []
    model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append("mlp"))
    model.model.norm.register_forward_hook(lambda *a: calls.append("norm"))
    hoptune.fuse_decoder_ops(model)
    assert calls == []
    hoptune.unfuse_decoder_ops(model)


def test_a_forward_restored_behind_fusion_counts_as_unfused():
    model = _model("llama")
    hoptune.fuse_decoder_ops(model)
    attn = model.model.layers[0].self_attn
    attn.forward = type(attn).forward.__get__(attn)  # (what removing a hook set before fusing leaves)
    assert fusion.fused_counts(model)["rope"] == 1
    assert hoptune.fuse_decoder_ops(model)["rope"] == 2  # (fused again)
    assert hoptune.unfuse_decoder_ops(model) == 9


def test_a_fused_model_installs_the_dispatcher_it_needs(monkeypatch):
    # (a fused model unpickled in a new process finds the module's function as transformers left it)
    model = _model("llama").to(torch.bfloat16)
    hoptune.fuse_decoder_ops(model)
    pymod = sys.modules[type(model).__module__]
    monkeypatch.setattr(pymod, "apply_rotary_pos_emb", pymod.apply_rotary_pos_emb._hoptune_original)
    monkeypatch.setattr(fusion, "_DISPATCHED", set())
    calls = _kernels_everywhere(monkeypatch)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)))
    assert calls["rope"] == 4
    hoptune.unfuse_decoder_ops(model)


def test_fusing_leaves_every_module_in_the_mode_it_was_in():
    """The checks run the MLPs in eval and train mode; afterwards each module is back in its own
    mode: a model in eval mode stays in eval mode (no dropout switched on), and a submodule set apart
    keeps its mode."""
    model = _model("llama").eval()
    hoptune.fuse_decoder_ops(model)
    assert not any(m.training for m in model.modules())
    hoptune.unfuse_decoder_ops(model)
    model.train()
    model.model.layers[1].mlp.eval()
    hoptune.fuse_decoder_ops(model)
    assert [n for n, m in model.named_modules() if not m.training] == [
        "model.layers.1.mlp",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.act_fn",
    ]
    hoptune.unfuse_decoder_ops(model)


def test_a_norm_whose_output_has_another_dtype_is_left():
    """A norm whose values are Llama's but returned in float32 for bf16 inputs (its output dtype is
    part of what it computes) is not fused: the fused op would return x's dtype."""

    class Float32Out(_GatedNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states).float()

    assert hoptune.fuse_decoder_ops(torch.nn.Sequential(Float32Out(16)))["rms_norm"] == 0
    assert hoptune.fuse_decoder_ops(torch.nn.Sequential(_GatedNorm(16)))["rms_norm"] == 1


def test_the_rotary_dispatcher_runs_the_fused_op_only_on_the_layout_it_takes(monkeypatch):
    """Inside a fused attention layer the dispatcher runs the fused rope for q, k (B, H, S, D) with
    cos and sin broadcast over dim 1; called with unsqueeze_dim=2 (q and k as (B, S, H, D)) it runs
    the original function, even where the shapes would pass for the other layout."""
    from hoptune.reference import decoder as ref

    def llama(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return tuple(t * cos + ref.rotate_half(t) * sin for t in (q, k))

    calls = _kernels_everywhere(monkeypatch)
    dispatch = fusion._rope_dispatcher(llama)
    q, k = torch.randn(1, 4, 4, 16).bfloat16(), torch.randn(1, 4, 4, 16).bfloat16()  # (S = H = 4)
    cos, sin = torch.randn(1, 4, 16).bfloat16(), torch.randn(1, 4, 16).bfloat16()
    token = fusion._ROPE_ON.set(True)
    try:
        got = dispatch(q, k, cos, sin, unsqueeze_dim=2)
        assert calls["rope"] == 0
        assert all(torch.equal(g, w) for g, w in zip(got, llama(q, k, cos, sin, unsqueeze_dim=2)))
        got = dispatch(q, k, cos, sin)
        assert calls["rope"] == 2
        assert all(torch.equal(g, w) for g, w in zip(got, llama(q, k, cos, sin)))
    finally:
        fusion._ROPE_ON.reset(token)


def test_fusing_again_does_not_wrap_the_rotary_function_again():
    """The dispatcher is installed once in a model's Python module: fusing other models (or the same
    one again) leaves it wrapping transformers' own function, not another dispatcher."""
    for _ in range(3):
        model = _model("llama")
        hoptune.fuse_decoder_ops(model)
        hoptune.unfuse_decoder_ops(model)
    fn = sys.modules[type(model).__module__].apply_rotary_pos_emb
    assert fn._hoptune_original is not None
    assert getattr(fn._hoptune_original, "_hoptune_original", None) is None


def test_a_fused_norm_runs_with_its_own_eps(monkeypatch):
    """The fused norm passes the module's own epsilon (here 1e-3, not Llama's default 1e-6) to the
    op: the same numbers as the module's forward, on rows small enough for eps to matter."""
    norm = _GatedNorm(16)
    norm.variance_epsilon = 1e-3
    model = torch.nn.Sequential(norm).to(torch.bfloat16)
    assert hoptune.fuse_decoder_ops(model)["rms_norm"] == 1
    calls = _kernels_everywhere(monkeypatch)
    x = (0.01 * torch.randn(3, 16)).bfloat16()
    assert torch.equal(model(x), type(norm).forward(norm, x)) and calls["rms_norm"] == 1
    hoptune.unfuse_decoder_ops(model)


def test_a_fused_attention_layer_still_runs_the_forward_set_on_it_before():
    """An attention layer whose forward was set on the instance (an offloading hook's) before fusing:
    the fused forward calls that one, not the class's, so the hook keeps running."""
    model = _model("llama")
    attn = model.model.layers[0].self_attn
    own, calls = attn.forward, []
    attn.forward = lambda *a, **k: calls.append(1) or own(*a, **k)
    assert hoptune.fuse_decoder_ops(model)["rope"] == 2
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)))
    assert calls == [1]
    hoptune.unfuse_decoder_ops(model)
