"""Double backward (``torch.autograd.grad(..., create_graph=True)``) for the custom ops, and its clear refusal where
a method has no second derivative (docs/reliability.md).

A custom op's registered backward runs its backward kernel, an opaque op with no derivative of its own. When the graph
of the backward is asked for, the op's backward instead takes autograd of the op's forward written in torch ops (the
same math as its kernels), which autograd can differentiate again: the Triton path then supports double backward
wherever the reference does, at the reference's speed for that (rare) call.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def wants_double_backward() -> bool:
    """Inside a backward: whether its own graph is being recorded (``create_graph=True``)."""
    return torch.is_grad_enabled()


def differentiable_backward(formula: Callable[..., object], inputs: Sequence[object],
                            grad_outputs: Sequence[Optional[Tensor]],
                            needs_input_grad: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """The gradients of ``formula(*inputs)`` for each input with ``needs_input_grad`` (``None`` elsewhere), each in its
    input's dtype, differentiable again in the inputs and in ``grad_outputs``.

    ``torch.func.vjp`` rather than ``torch.autograd.grad``: the inputs are tensors of the outer graph, often computed
    from one another (an op's coefficients from its input's statistics), and ``autograd.grad`` would return their
    total derivatives through that history; ``vjp`` gives the partial derivatives of ``formula`` alone, and its result
    stays connected to the outer graph for the next derivative."""
    wrt = [i for i, (t, need) in enumerate(zip(inputs, needs_input_grad)) if need and isinstance(t, Tensor)]
    result: list[Optional[Tensor]] = [None] * len(inputs)
    if not wrt:
        return tuple(result)

    def of_differentiable(*values: Tensor) -> tuple[Tensor, ...]:
        args = list(inputs)
        for i, value in zip(wrt, values):
            args[i] = value
        outputs = formula(*args)
        return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)

    with torch.enable_grad():
        outputs, vjp = torch.func.vjp(of_differentiable, *[inputs[i] for i in wrt])
        cotangents = tuple(torch.zeros_like(out) if grad is None else grad.to(out.dtype)
                           for out, grad in zip(outputs, grad_outputs))
        grads = vjp(cotangents)
    for i, grad in zip(wrt, grads):
        result[i] = grad.to(inputs[i].dtype)
    return tuple(result)


def refuse_double_backward(what: str) -> None:
    """Raise the one clear error of a backward that has no derivative, when ``create_graph=True`` asks for one."""
    if wants_double_backward():
        raise RuntimeError(
            f"{what} has no second derivative: double backward (torch.autograd.grad(..., create_graph=True), e.g. "
            "a gradient penalty) is not supported through it, on any backend")


def recomputed_backward(ctx, formula: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]],
                        dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """The double-backward path of a fused layer's :class:`torch.autograd.Function` whose first ``len(inputs)``
    arguments are its differentiable tensors: :func:`differentiable_backward` of ``formula`` (the whole layer in torch
    ops, with the statistics the forward used fixed and no running-buffer update), ``None`` for the other arguments."""
    grads = differentiable_backward(formula, inputs, (dy,), ctx.needs_input_grad[:len(inputs)])
    return grads + (None,) * (len(ctx.needs_input_grad) - len(inputs))
