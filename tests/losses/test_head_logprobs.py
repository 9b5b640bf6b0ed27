"""head_logprobs on an nn.Linear head that carries hooks: the head runs as the model runs it
(hooks and all), not through the fused op, which reads head.weight directly."""

from __future__ import annotations

import functools

import pytest
import torch

from hoptune.losses import head_logprobs, token_logprobs_from_logits
from hoptune.losses import logprobs as logprobs_mod


def _hook_output(m, args, out):
    return out * 0.5 + 1.0


def _hook_input(m, args):
    return (args[0] * 2.0,)


def _override_forward(head):
    # what accelerate's add_hook_to_module does: an instance attribute in place of forward
    old = head.forward

    def forward(x):
        return old(x) * 1.5

    head.forward = functools.update_wrapper(forward, old)


@pytest.mark.parametrize("hook", ["forward", "pre", "instance_forward"])
def test_head_logprobs_runs_a_hooked_linear_head(hook, monkeypatch):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 37)
    hidden = torch.randn(9, 16, generator=g).requires_grad_(True)
    labels = torch.randint(0, 37, (9,), generator=g)
    if hook == "forward":
        head.register_forward_hook(_hook_output)
    elif hook == "pre":
        head.register_forward_pre_hook(_hook_input)
    else:
        _override_forward(head)
    ref = token_logprobs_from_logits(head(hidden).double(), labels)
    got = head_logprobs(head, hidden, labels, logit_scale=1.0)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    up = torch.randn(9, generator=g)
    (gh,) = torch.autograd.grad((got * up).sum(), hidden)
    (rh,) = torch.autograd.grad((ref * up.double()).sum(), hidden)
    torch.testing.assert_close(gh, rh.float(), rtol=0, atol=1e-5)


def test_head_logprobs_plain_linear_stays_fused(monkeypatch):
    """Without hooks the plain head still takes the fused op."""
    calls = []
    real = logprobs_mod.fused_linear_logprobs

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(logprobs_mod, "fused_linear_logprobs", spy)
    head = torch.nn.Linear(8, 11)
    head_logprobs(head, torch.randn(3, 8), torch.randint(0, 11, (3,)))
    assert calls == [1]
    handle = head.register_forward_hook(_hook_output)
    head_logprobs(head, torch.randn(3, 8), torch.randint(0, 11, (3,)))
    assert calls == [1]
    handle.remove()
    head_logprobs(head, torch.randn(3, 8), torch.randint(0, 11, (3,)))
    assert calls == [1, 1]


@pytest.mark.parametrize("bias", [True, False])
def test_head_logprobs_plain_linear_is_the_log_softmax_of_the_heads_logits(bias):
    """The fused path (a plain nn.Linear head) scores the head's own logits, its bias included, with
    the scale, soft-cap and temperature: against the fp64 computation."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 37, bias=bias)
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.randn(37, generator=g) * 3)
    hidden = torch.randn(9, 16, generator=g)
    labels = torch.randint(0, 37, (9,), generator=g)
    got = head_logprobs(head, hidden, labels, logit_scale=0.7, softcap=5.0, temperature=0.9)
    b = None if head.bias is None else head.bias.double()
    z = torch.nn.functional.linear(hidden.double(), head.weight.double(), b)
    z = 5.0 * torch.tanh(z * 0.7 / 5.0) / 0.9
    ref = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


class _ScaledLinear(torch.nn.Linear):
    """An nn.Linear subclass with its own forward (as a quantized or wrapped head may have)."""

    def forward(self, x):
        return super().forward(x) * 0.5 - 0.25


def test_head_logprobs_runs_a_linear_subclass_with_its_own_forward():
    """A head whose class derives from nn.Linear is applied through its own forward, not through
    the fused op (which reads head.weight and would skip that forward)."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    head = _ScaledLinear(16, 37)
    hidden = torch.randn(9, 16, generator=g)
    labels = torch.randint(0, 37, (9,), generator=g)
    ref = token_logprobs_from_logits(head(hidden).double(), labels)
    got = head_logprobs(head, hidden, labels)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["full_backward", "full_backward_pre"])
def test_head_logprobs_runs_a_head_with_backward_hooks(kind):
    """A plain nn.Linear head with a backward hook runs as a module, so that the hook sees the
    gradient of the head's output in the backward (the fused op would never call it)."""
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 37)
    seen = []

    def hook(module, *grads):
        seen.append(grads[-1][0].shape)

    if kind == "full_backward":
        head.register_full_backward_hook(hook)
    else:
        head.register_full_backward_pre_hook(hook)
    hidden = torch.randn(9, 16, generator=g).requires_grad_(True)
    labels = torch.randint(0, 37, (9,), generator=g)
    head_logprobs(head, hidden, labels).sum().backward()
    assert seen == [torch.Size([9, 37])]
