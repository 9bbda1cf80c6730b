"""Gradient checkpointing whose first pass builds no autograd graph.

``torch.utils.checkpoint`` (non-reentrant) runs the forward with grad mode on: every op still
creates its autograd node, only the saved tensors are dropped, and on a CPU that bookkeeping
costs about as much as the arithmetic of the solver's small element-wise ops. Here the first
pass runs under ``no_grad`` (inference speed: the ADMM takes its in-place path where it can),
and the backward pass recomputes the step with a graph and backpropagates through it.

The recomputation gets the decisions of the first pass (``aux``: the safeguard's step scale,
...), so it repeats only what gradients flow through, and it follows the same branch as the
first pass even where a decision sat on a float tie.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class _Checkpoint(torch.autograd.Function):
    """``out = first(*args)[0]`` without a graph; the backward recomputes ``again(*args, aux)``."""

    @staticmethod
    def forward(ctx, first: Callable, again: Callable, holder: list, *args):
        out, aux = first(*args)  # autograd.Function.forward runs in no-grad mode
        holder.append(aux)
        ctx.again, ctx.aux = again, aux
        ctx.others = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*(a if isinstance(a, Tensor) else None for a in args))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        needs = ctx.needs_input_grad[3:]
        args = [
            other if t is None else t.detach().requires_grad_(need)
            for t, other, need in zip(ctx.saved_tensors, ctx.others, needs)
        ]
        with torch.enable_grad():
            out = ctx.again(*args, ctx.aux)
        wanted = [i for i, need in enumerate(needs) if need]
        grads = [None] * len(args)
        if out.requires_grad and wanted:
            found = torch.autograd.grad(
                out, [args[i] for i in wanted], grad_out, allow_unused=True
            )
            for i, g in zip(wanted, found):
                grads[i] = g
        return (None, None, None, *grads)


def checkpoint_call(first: Callable, again: Callable, *args: Any) -> tuple[Tensor, Any]:
    """``first(*args) -> (out, aux)`` run without an autograd graph; gradients of ``out``
    reach the tensors among ``args`` by recomputing ``again(*args, aux) -> out`` (the same
    value, given the first pass's ``aux``) with a graph in the backward pass.

    Memory: only ``args`` are kept between the passes, and one step's graph lives at a time
    during the backward pass. Time: the first pass at inference speed, plus one recomputation.
    ``aux`` (tensors or anything else) gets no gradient. Without grad mode, or without a
    tensor in ``args`` that requires grad, this is ``first(*args)``.
    """
    needs_graph = torch.is_grad_enabled() and any(
        isinstance(a, Tensor) and a.requires_grad for a in args
    )
    if not needs_graph:
        return first(*args)
    holder: list = []
    out = _Checkpoint.apply(first, again, holder, *args)
    return out, holder[0]
