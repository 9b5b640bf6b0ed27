"""Swap a decoder's elementwise ops for hoptune's fused kernels (hoptune.ops.decoder), in place.

``fuse_decoder_ops(model)`` finds, in a transformers model, the modules whose computation is the
Llama family's (LlamaRMSNorm, the SwiGLU MLP, apply_rotary_pos_emb: Llama, Mistral, Qwen2/3 and
the others built from them) and gives each instance a forward that runs the fused op instead.
Nothing is matched by class name: each kind is first checked on random inputs, the module's own
forward against the op's reference, and is left alone unless the two agree bit for bit (Gemma's
``1 + weight`` norm, a GELU MLP or an interleaved rotary embedding do not, and stay as they are).
The checks run each class's forward on probes of their own (in float32, bf16 and fp16, on the
CPU, without the module's hooks; an MLP's projections run on a few random rows). The parameters,
state dict, hooks and class of every module are untouched, and ``unfuse_decoder_ops(model)``
restores the original forwards. The fused forwards are bound to their modules: replicas made by
``nn.DataParallel`` would run the original modules, so unfuse a model before replicating it.

The rotary embedding is a function of the model's Python module that its attention forward calls,
not a module: it is replaced there by a dispatcher that runs the fused op only inside the forward
of an attention layer of a fused model, and calls the original function everywhere else (other
models of the same class, an unfused one). The dispatcher stays after unfuse_decoder_ops (a copy
of a fused model may still use it); outside fused layers it is the original function.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import sys

import torch
from torch import nn

from hoptune.ops import decoder as ops
from hoptune.reference import decoder as ref

_KIND = "_hoptune_fused"  # on a fused module: its kind, and the forward it had as an attribute
_PREV = "_hoptune_prev_forward"
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
_ROPE_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("hoptune_rope_on", default=False)

KINDS = ("rms_norm", "swiglu", "rope")
_DISPATCHED: set[type] = set()  # attention classes whose module's dispatcher a forward has seen


# -- the forwards ---------------------------------------------------------------------------------
# Each runs the fused op where its kernel runs and the module's own forward everywhere else (a CPU,
# fp32, a weight of another dtype, extra arguments): that forward, not the op's reference, is the
# model's computation for inputs the check did not cover.
def _original(self):
    """The forward the module had before it was fused: an instance one (a hook's) or its class's."""
    prev = self.__dict__.get(_PREV)
    return prev if prev is not None else functools.partial(type(self).forward, self)


def _rms_norm_forward(self, hidden_states, *args, **kwargs):
    w = self.weight
    if (
        args
        or kwargs
        or not isinstance(hidden_states, torch.Tensor)
        or not ops.rms_norm_runs(hidden_states, w)
    ):
        return _original(self)(hidden_states, *args, **kwargs)
    return ops.rms_norm(hidden_states, w, getattr(self, self._hoptune_eps_name))


def _swiglu_forward(self, x, *args, **kwargs):
    if args or kwargs:
        return _original(self)(x, *args, **kwargs)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not ops.silu_mul_runs(gate, up):
        return self.down_proj(self.act_fn(gate) * up)  # (the model's own expression)
    return self.down_proj(ops.silu_mul(gate, up))


def _attention_forward(self, *args, **kwargs):
    if torch.compiler.is_compiling():
        # (a context variable does not trace: compiled, the attention keeps its own rotary ops,
        # which the compiler fuses itself)
        return _original(self)(*args, **kwargs)
    cls = type(self)
    if cls not in _DISPATCHED:  # (a fused model unpickled in another process: none installed yet)
        _dispatcher_for(cls)
        _DISPATCHED.add(cls)
    token = _ROPE_ON.set(True)
    try:
        return _original(self)(*args, **kwargs)
    finally:
        _ROPE_ON.reset(token)


_OURS = (_rms_norm_forward, _swiglu_forward, _attention_forward)


def _rope_dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if torch.compiler.is_compiling() or not _ROPE_ON.get():
            return original(q, k, cos, sin, *args, **kwargs)
        extra = list(args) + [v for key, v in kwargs.items() if key != "unsqueeze_dim"]
        # (position_ids, where a version still takes it, is unused by the function)
        plain = kwargs.get("unsqueeze_dim", 1) == 1 and len(args) <= 1 and all(v is None for v in extra)
        tensors = all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin))
        if (
            plain
            and tensors
            and q.dim() == 4
            and k.dim() == 4
            and q.shape[0] == k.shape[0]
            and q.shape[2:] == k.shape[2:]
            and cos.dim() == 3
            and cos.shape == sin.shape
            and cos.shape[0] in (1, q.shape[0])
            and tuple(cos.shape[1:]) == tuple(q.shape[2:])
            and q.shape[-1] % 2 == 0
            and q.dtype == k.dtype
            and ops.rope_runs(q, cos, sin)
        ):
            return ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._hoptune_original = original
    return apply_rotary_pos_emb


# -- the checks -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _mode(mod: nn.Module, training: bool):
    """``mod`` in train or eval mode, then each submodule's own mode back."""
    modes = [(m, m.training) for m in mod.modules()]
    mod.train(training)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _randn(shape, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # (a generator of our own: fusing does not move the caller's random stream)
    return torch.randn(shape, generator=gen, device="cpu", dtype=torch.float32).to(like.device, like.dtype)


def _eps_name(mod: nn.Module) -> str | None:
    for name in _EPS_NAMES:
        if isinstance(getattr(mod, name, None), float):
            return name
    return None


# the dtypes the kernels run in, and float32: a check passes in all of them (a norm or rotary
# function can agree with Llama's in one dtype and not in another, and a model's dtype may change
# after it is fused)
_CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU = torch.empty(0)


def _is_rms_norm(mod: nn.Module, gen: torch.Generator) -> bool:
    w = mod._parameters.get("weight")
    params = [n for n, _ in mod.named_parameters()]
    if w is None or w.dim() != 1 or params != ["weight"] or _eps_name(mod) is None or list(mod.children()):
        return False
    # the class's forward on a probe: a shallow copy holding a random weight of its own on the CPU
    # (the module's weight may be all ones as initialised, which makes OLMo2's norm agree with
    # this one, or empty, on the meta device, sharded), called without the module's hooks
    n = w.shape[0]
    if n == 0:
        return False
    probe = copy.copy(mod)
    eps = getattr(mod, _eps_name(mod))
    for dtype in _CHECK_DTYPES:
        like = _CPU.to(dtype)
        probe._parameters = {"weight": nn.Parameter(1 + 0.5 * _randn((n,), like, gen), requires_grad=False)}
        x = 4 * _randn((3, n), like, gen)
        try:
            with torch.no_grad():
                got = type(mod).forward(probe, x)
                want = ref.rms_norm(x, probe.weight, eps)
            if not (isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)):
                return False
        except torch.OutOfMemoryError:
            raise
        except Exception:  # (a module of another signature: not one of these)
            return False
    return True


def _seeded(device: torch.device):
    """The global generators of the CPU and of ``device`` (a CUDA one) forked and seeded with 0;
    the caller's states come back after."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    fork = torch.random.fork_rng(devices=devices)

    @contextlib.contextmanager
    def seeded():
        with fork:
            torch.default_generator.manual_seed(0)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(0)
            yield

    return seeded()


def _is_swiglu(mod: nn.Module, gen: torch.Generator) -> bool:
    parts = [getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Module) for p in parts) or not callable(getattr(mod, "act_fn", None)):
        return False
    k = getattr(parts[0], "in_features", None)
    like = next(iter(parts[0].parameters()), None)
    if not isinstance(k, int) or k <= 0 or like is None or like.device.type == "meta":
        return False
    like = like if like.is_floating_point() else torch.empty(0, dtype=torch.bfloat16, device=like.device)
    dtype = getattr(parts[0], "base_dtype", None)  # (hoptune's LoRA layers: the dtype its input takes)
    x = _randn((2, k), like, gen)
    if isinstance(dtype, torch.dtype):
        x = x.to(dtype)

    def fused(t):
        return mod.down_proj(ref.silu_mul(mod.gate_proj(t), mod.up_proj(t)))

    # eval mode on small and large inputs (a clamp of the activations shows on the large ones), and
    # train mode with one seed for both (dropout outside the projections shows there); the class's
    # forward, without the module's own hooks (its projections run on these few random rows)
    try:
        with torch.no_grad():
            for training, scale in ((False, 1.0), (False, 40.0), (True, 1.0)):
                t = x * scale
                with _mode(mod, training):
                    with _seeded(t.device):
                        got = type(mod).forward(mod, t)
                    with _seeded(t.device):
                        want = fused(t)
                if not (isinstance(got, torch.Tensor) and torch.equal(got, want)):
                    return False
    except torch.OutOfMemoryError:
        raise
    except Exception:
        return False
    return True


def _rope_function_matches(fn, gen: torch.Generator) -> bool:
    d = 32
    for dtype in _CHECK_DTYPES:
        like = _CPU.to(dtype)
        q, k = _randn((2, 3, 5, d), like, gen), _randn((2, 1, 5, d), like, gen)
        cos, sin = _randn((2, 5, d), like, gen), _randn((2, 5, d), like, gen)
        try:
            got = fn(q, k, cos, sin)
        except Exception:
            return False
        want = ref.rope(q, cos, sin), ref.rope(k, cos, sin)
        if not (
            isinstance(got, tuple)
            and len(got) == 2
            and all(isinstance(g, torch.Tensor) and torch.equal(g, w) for g, w in zip(got, want, strict=True))
        ):
            return False
    return True


# -- fuse / unfuse --------------------------------------------------------------------------------
def _set_forward(mod: nn.Module, kind: str, forward) -> None:
    setattr(mod, _PREV, mod.__dict__.get("forward"))
    # (a partial, not a bound method: it pickles, and a deep copy binds it to the copied module)
    mod.forward = functools.partial(forward, mod)
    setattr(mod, _KIND, kind)


def _ours(mod: nn.Module) -> bool:
    """Whether the module's instance forward is the one fuse_decoder_ops set (not a wrapper put on
    it since)."""
    fwd = mod.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func in _OURS and fwd.args[:1] == (mod,)


def _kind(mod: nn.Module) -> str | None:
    """The kind ``mod`` is fused as, or None. A module marked fused whose forward is neither ours
    nor a wrapper put on since, but its class's own again (a hook removed that had been set before
    fusing, and restored the forward it found), is no longer fused: its marks are cleared."""
    kind = mod.__dict__.get(_KIND)
    if kind is None or _ours(mod):
        return kind
    fwd = mod.__dict__.get("forward")
    if fwd is None or getattr(fwd, "__func__", None) is type(mod).forward:
        for name in (_KIND, _PREV, "_hoptune_eps_name"):
            mod.__dict__.pop(name, None)
        if fwd is not None:
            del mod.__dict__["forward"]
        return None
    return kind


def fuse_decoder_ops(
    model: nn.Module, rms_norm: bool = True, swiglu: bool = True, rope: bool = True
) -> dict[str, int]:
    """Give ``model``'s RMSNorm, SwiGLU MLP and attention layers forwards that run hoptune's fused
    kernels (one pass each, forward and backward; see hoptune.ops.decoder), where their own
    computation is the Llama family's (checked on random inputs, bit for bit). Where the kernels
    cannot run (CPU, fp32, other GPUs) the fused forwards run the same PyTorch ops as before.

    Returns the number of modules fused of each kind ({"rms_norm": n, "swiglu": n, "rope": n});
    a model fused already is left as it is (its counts returned again). Undo with
    :func:`unfuse_decoder_ops`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("rms_norm", rms_norm), ("swiglu", swiglu), ("rope", rope)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    gen = torch.Generator().manual_seed(0)
    verdict: dict[tuple[str, type], bool] = {}  # one check per class and kind

    def matches(kind: str, mod: nn.Module, check) -> bool:
        key = (kind, type(mod))
        if key not in verdict:
            verdict[key] = check(mod, gen)
        return verdict[key]

    counts = dict.fromkeys(KINDS, 0)
    for mod in model.modules():
        kind = _kind(mod)
        if kind is not None:
            counts[kind] += 1
            continue
        # a forward set on the instance by someone else (an offloading hook) is kept: such a norm
        # or MLP stays as it is; an attention layer's is wrapped (the fused one calls it)
        hooked = "forward" in mod.__dict__
        if rms_norm and not hooked and matches("rms_norm", mod, _is_rms_norm):
            mod._hoptune_eps_name = _eps_name(mod)
            _set_forward(mod, "rms_norm", _rms_norm_forward)
            counts["rms_norm"] += 1
        elif swiglu and not hooked and matches("swiglu", mod, _is_swiglu):
            _set_forward(mod, "swiglu", _swiglu_forward)
            counts["swiglu"] += 1
        elif rope and _fuse_rope(mod, gen, verdict):
            counts["rope"] += 1
    return counts


def _dispatcher_for(cls: type, gen: torch.Generator | None = None, verdict: dict | None = None) -> bool:
    """Install the rotary dispatcher in the Python module of attention class ``cls`` (once; the
    module's function checked first); whether it is there."""
    modname = cls.__module__
    pymod = sys.modules.get(modname)
    fn = getattr(pymod, "apply_rotary_pos_emb", None)
    if not callable(fn):
        return False
    if getattr(fn, "_hoptune_original", None) is not None:
        return True
    verdict = {} if verdict is None else verdict
    key = ("rope", modname)
    if key not in verdict:
        verdict[key] = _rope_function_matches(fn, gen or torch.Generator().manual_seed(0))
    if verdict[key]:
        pymod.apply_rotary_pos_emb = _installed(fn, _rope_dispatcher(fn))
    return verdict[key]


def _installed(fn, dispatcher):
    """What takes the module's ``apply_rotary_pos_emb``: the dispatcher itself, or, where the
    function is a module (transformers with the ``kernels`` package makes it one, its class built
    around the function), a new instance of that class that runs the dispatcher. kernels rebuilds
    each attention layer's own copy of the function on unpickling as ``type(<the module's
    attribute>)()``: a plain function there broke ``torch.load`` of every model of the module's
    classes, fused or not. The dispatcher falls back to the original instance, which routes calls to
    a kernelized model's own copy as before."""
    if not isinstance(fn, nn.Module):
        return dispatcher
    inst = type(fn)()
    object.__setattr__(inst, "forward", dispatcher)  # (nn.Module.__call__ runs the instance's)
    object.__setattr__(inst, "_hoptune_original", fn)  # (an attribute, not a submodule)
    return inst


def _fuse_rope(mod: nn.Module, gen: torch.Generator, verdict: dict) -> bool:
    if not type(mod).__name__.endswith("Attention") or not _dispatcher_for(type(mod), gen, verdict):
        return False
    _set_forward(mod, "rope", _attention_forward)
    return True


def unfuse_decoder_ops(model: nn.Module) -> int:
    """Undo :func:`fuse_decoder_ops`: every fused module of ``model`` gets its own forward back, so
    its attention layers no longer reach the fused rotary embedding. A module whose forward was
    wrapped again after fusing (an offloading hook set since) is left as it is, the hook's
    wrapping the fused forward. Returns the number of modules restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for mod in model.modules():
        kind = _kind(mod)
        if kind is None or not _ours(mod):
            continue
        prev = mod.__dict__.pop(_PREV, None)
        del mod.__dict__["forward"]
        if prev is not None:
            mod.forward = prev
        del mod.__dict__[_KIND]
        mod.__dict__.pop("_hoptune_eps_name", None)
        n += 1
    return n


def fused_counts(model: nn.Module) -> dict[str, int]:
    """How many modules of ``model`` are fused, by kind."""
    counts = dict.fromkeys(KINDS, 0)
    for mod in model.modules():
        kind = _kind(mod)
        if kind is not None:
            counts[kind] += 1
    return counts
