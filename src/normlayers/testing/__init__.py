"""Tolerances and assert helpers shared by the tests (and usable by anyone checking a layer against its reference).

Two rules (docs/testing.md):

* **fp32 / fp64** results are compared with :func:`torch.testing.assert_close` against a reference computed in the
  same or a wider dtype, with the tolerances of :data:`TOLERANCES`.
* **fp16 / bf16** results follow the relative rule of :func:`assert_lowprec_close`: our error against an fp64
  reference may be at most twice PyTorch's own low-precision error (``max|ours − ref64| ≤ 2·max|torch − ref64| +
  atol``). That keeps us honest without guessing how wrong a bf16 norm is allowed to be.
"""

from __future__ import annotations

from typing import Optional

import torch

from normlayers._checks import check_choice

__all__ = ["FAST_GRADCHECK", "NCHW_LAYOUTS", "PLANE_KERNEL_SHAPES", "TOLERANCES", "tolerance", "assert_close",
           "assert_compiled_matches_eager", "assert_lowprec_close", "assert_state_dict_loads_both_ways",
           "max_abs_error", "nchw_input", "run_training_steps"]

# dtype -> (rtol, atol). Each entry widens torch.testing's default only with the reason written beside it.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # torch.testing defaults for fp64 are (1e-7, 1e-7); fp64 kernels receive eps and weight_offset as fp32 scalars
    # (Triton types Python floats as fp32), a relative change of up to ~1e-8 in the result.
    torch.float64: (1e-7, 1e-7),
    # torch.testing's fp32 defaults (1.3e-6, 1e-5): kernels and reference both accumulate in fp32, in different orders.
    torch.float32: (1.3e-6, 1e-5),
    # Used only as the atol of the low-precision rule (one ulp near 1.0; fp16 ~1e-3, bf16 ~8e-3).
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


# torch.autograd.gradcheck's fast mode (one random projection vᵀJu of the Jacobian, two evaluations instead of
# ~2·numel: the full check of a Triton op under the interpreter takes minutes). Fast mode compares one scalar, in which
# an error in one gradient term can cancel: with gradcheck's default tolerances (atol 1e-5, rtol 1e-3) a 1% error in
# BatchChannelNorm's plane-variance gradient passed; at these, which fp64 central differences meet with margin
# (their error is ~1e-10 relative), it fails.
FAST_GRADCHECK: dict[str, object] = {"fast_mode": True, "atol": 1e-7, "rtol": 1e-6}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results of ``dtype``."""
    return TOLERANCES[dtype]


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| computed in fp64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                 msg: str = "") -> None:
    """:func:`torch.testing.assert_close` with the tolerance of ``dtype`` (default: ``actual.dtype``); ``expected``
    may be wider (it is cast to ``actual``'s dtype for the comparison)."""
    rtol, atol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def assert_lowprec_close(actual: torch.Tensor, torch_lowprec: torch.Tensor, reference64: torch.Tensor, *,
                         atol: Optional[float] = None, msg: str = "") -> None:
    """The low-precision rule: ``max|actual − ref64| ≤ 2·max|torch_lowprec − ref64| + atol``.

    ``torch_lowprec`` is the same computation done by PyTorch in the low-precision dtype (e.g. ``F.layer_norm`` on
    the bf16 input), ``reference64`` the fp64 result. ``atol`` defaults to the table's entry for ``actual.dtype``.
    """
    if actual.shape != reference64.shape:
        raise AssertionError(f"{msg} shape {tuple(actual.shape)} != reference shape {tuple(reference64.shape)}")
    ours = max_abs_error(actual, reference64)
    theirs = max_abs_error(torch_lowprec, reference64)
    bound = 2.0 * theirs + (atol if atol is not None else tolerance(actual.dtype)[1])
    if not ours <= bound:  # also fails on NaN
        raise AssertionError(f"{msg} max error {ours:.3e} vs fp64 exceeds 2 x torch's {theirs:.3e} + atol "
                             f"(bound {bound:.3e}) for dtype {actual.dtype}")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs for per-plane (NCHW) kernels and layers
# ----------------------------------------------------------------------------------------------------------------------

# The memory layouts every per-plane kernel must read in place: NCHW, channels-last, and a channel slice of a wider
# activation (sample stride (C + 2)·H·W, not C·H·W).
NCHW_LAYOUTS = ("contiguous", "channels_last", "channel_slice")

# (N, C, H, W, max_block_hw) edge shapes of the per-plane kernels: HW = 1, odd HW with N = 1, several planes per
# program, and planes wider than one block (the chunked loops: 35 values in blocks of 8, 300 in blocks of 64).
PLANE_KERNEL_SHAPES = (
    (3, 4, 1, 1, None),
    (1, 5, 3, 7, None),
    (2, 3, 5, 7, 8),
    (2, 70, 2, 3, None),
    (2, 3, 15, 20, 64),
)


def nchw_input(n: int, c: int, h: int, w: int, dtype: torch.dtype, layout: str = "contiguous",
               device: torch.device | str = "cpu", *, seed: int = 0, scale: float = 1.0,
               plane_offset: float = 0.0) -> torch.Tensor:
    """A reproducible ``(n, c, h, w)`` test input in ``layout`` (one of :data:`NCHW_LAYOUTS`):
    ``scale·N(0, 1)`` plus, per (sample, channel) plane, ``plane_offset·N(0, 1)`` (an offset larger than the spread
    makes centred statistics matter), drawn in fp64 and rounded to ``dtype``."""
    check_choice("layout", layout, NCHW_LAYOUTS)
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, c + 2, h, w, generator=gen, dtype=torch.float64) * scale
    if plane_offset:
        wide = wide + plane_offset * torch.randn(n, c + 2, 1, 1, generator=gen, dtype=torch.float64)
    x = wide.to(dtype).to(device)
    if layout == "channels_last":
        return x[:, :c].contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        return x[:, 1:c + 1]
    return x[:, :c].contiguous()


def assert_compiled_matches_eager(module: torch.nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(fullgraph=True)`` of a training step (forward, ``square().sum()`` loss, backward) of a copy of
    ``module`` on backend ``"triton"`` gives exactly the eager step's loss, input and parameter gradients and buffers
    (the same kernels and the same small ops run, compiled or not), and those agree with backend ``"reference"``."""
    import copy

    from normlayers.backends import backend

    torch._dynamo.reset()

    def loss_fn(mod: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return mod(inp).square().sum()

    def run(fn) -> list[torch.Tensor]:
        mod = copy.deepcopy(module)
        leaf = x.clone().requires_grad_()
        fn(mod, leaf).backward()
        return [leaf.grad, *(p.grad for p in mod.parameters()), *mod.buffers()]

    with backend("triton"):
        eager = run(loss_fn)
        compiled = run(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    with backend("reference"):
        reference = run(loss_fn)
    for a, b, c in zip(eager, compiled, reference):
        assert torch.equal(a, b)
        if a.is_floating_point():
            assert_close(a, c)
        else:
            assert torch.equal(a, c)


def assert_state_dict_loads_both_ways(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """``theirs``' state loads into ``ours`` strictly, and ``ours``' back into a zeroed copy of ``theirs`` strictly,
    giving ``theirs``' every tensor exactly: the same keys, shapes and values both ways."""
    import copy

    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = copy.deepcopy(theirs)
    with torch.no_grad():
        for p in back.parameters():
            p.zero_()
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def run_training_steps(module: torch.nn.Module, xs: list[torch.Tensor], backend_name: str
                       ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Forward and backward of ``module`` on each of ``xs`` in turn on backend ``backend_name``, with seeded random
    output gradients; returns, per step, ``[y, dx, *parameter grads]``, and the buffers after the last step."""
    from normlayers.backends import backend

    results = []
    with backend(backend_name):
        for i, x in enumerate(xs):
            module.zero_grad()
            leaf = x.clone().requires_grad_()
            y = module(leaf)
            gen = torch.Generator().manual_seed(10 + i)
            y.backward(torch.randn(y.shape, generator=gen).to(y.device, y.dtype))
            results.append([y.detach(), leaf.grad, *(p.grad.clone() for p in module.parameters())])
    return results, [b.clone() for b in module.buffers()]
