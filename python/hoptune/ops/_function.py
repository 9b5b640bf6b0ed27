"""A custom op's forward and backward as a plain autograd.Function, for eager calls."""

from __future__ import annotations

import torch


def eager_function(name: str, impl, setup_context, backward) -> type[torch.autograd.Function]:
    """A custom op's forward (impl, then setup_context) and backward (with traced=False: the
    bodies of the ops it calls, not the ops) as a plain autograd.Function named ``name`` (its
    graph nodes read ``<name>Backward``), for eager calls: it costs less host time than the
    op's dispatch, and the device waits for that host time at both ends of a call.
    torch.compile traces the custom op instead."""

    def forward(ctx, *inputs):
        out = impl(*inputs)
        setup_context(ctx, inputs, out)
        return out

    @torch.autograd.function.once_differentiable  # the backward is not itself differentiable
    def backward_(ctx, *grads):
        return backward(ctx, *grads, traced=False)

    body = {"forward": staticmethod(forward), "backward": staticmethod(backward_), "__doc__": impl.__doc__}
    return type(name, (torch.autograd.Function,), body)
