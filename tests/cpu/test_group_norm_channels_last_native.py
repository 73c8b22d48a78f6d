"""The compiled channels-last GroupNorm of the CPU tier (cpu/csrc/group_norm_channels_last.c): edge shapes, dtypes,
activations, gradient subsets, NaN, offsets, thread counts, and the ATen path it falls back to."""

from __future__ import annotations

import ctypes

import pytest
import torch

import normlayers
from normlayers import functional as NF
from normlayers.bench.accuracy import error_bounds, max_abs_error
from normlayers.cpu import _extension, _native
from normlayers.cpu import group_norm as cpu_group_norm
from normlayers.reference import group_norm as ref

from .conftest import run_backend, use_autograd_node

pytestmark = pytest.mark.skipif(_native.load("group_norm_channels_last") is None,
                                reason="no C compiler (or NORMLAYERS_CPU_KERNELS=0): the ATen path runs")

NAMES = ("y", "dx", "dweight", "dbias")


@pytest.fixture(autouse=True, params=["cpp", "python"])
def autograd_node(request, monkeypatch):
    """Every test with the C++ autograd node of the kernels (their default under autograd) and with the Python
    autograd.Function that runs where the node cannot be built."""
    use_autograd_node(request.param, monkeypatch)


def _channels_innermost(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its channels innermost and dense: channels_last / channels_last_3d, or a transposed ``(N, L, C)``."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _inputs(shape, offset=0.0, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = _channels_innermost(torch.randn(shape, generator=generator, dtype=torch.float64) + offset)
    weight = 1 + 0.1 * torch.randn(shape[1], generator=generator, dtype=torch.float64)
    bias = 0.1 * torch.randn(shape[1], generator=generator, dtype=torch.float64)
    return [t.to(dtype) for t in (x, weight, bias)]


def _results(backend, tensors, groups, act):
    return dict(zip(NAMES, run_backend(backend, lambda *t: NF.group_norm(t[0], groups, *t[1:], 1e-5, act), tensors)))


def _errors_and_bounds(shape, groups, act, dtype, offset=0.0):
    tensors = _inputs(shape, offset, dtype)
    ours = _results("auto", tensors, groups, act)
    baseline = _results("reference", tensors, groups, act)
    expected = _results("reference", [t.double() for t in tensors], groups, act)
    bounds = error_bounds(baseline, expected, dtype)
    return {name: (max_abs_error(ours[name], expected[name]), bounds[name]) for name in NAMES}, ours


SHAPES = {
    "one-channel-per-group": ((2, 8, 5, 7), 8),      # C = G, odd plane
    "C-not-a-vector": ((3, 20, 9, 11), 5),           # 20 channels: one vector and a partial one per row
    "tiles-and-tail": ((2, 72, 13, 10), 8),          # 4 full vectors and a partial one: a full tile, a partial tile
    "1d": ((3, 48, 301), 4),                         # a transposed (N, L, C): 2 blocks of 128 and one of 45
    "3d": ((2, 32, 3, 5, 7), 4),                     # channels_last_3d
    "batch-1-long-plane": ((1, 64, 40, 40), 32),     # 1600 positions: 13 blocks, the last of 64
    # batch 1: blocks shared out, the output and dx passes walk rows (rows_output), each with a partial vector
    "batch-1-C-not-a-vector": ((1, 20, 17, 9), 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", [None, "silu", "gelu", "relu"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_output_and_gradients_within_the_bound(case, act, dtype):
    """The output and every gradient within the bound of their dtype (twice the reference's error in that dtype
    against fp64, plus the dtype's tolerance), in the input's layout and dtype."""
    shape, groups = SHAPES[case]
    errors, ours = _errors_and_bounds(shape, groups, act, dtype)
    over = {name: f"{e:.3g} > {b:.3g}" for name, (e, b) in errors.items() if not e <= b}
    assert not over, over
    x = _inputs(shape, dtype=dtype)[0]
    compiled = not (act == "gelu" and dtype is torch.bfloat16)  # (else ATen's path: GELU of bf16 output rounds twice)
    for name in ("y", "dx"):
        assert ours[name].dtype == dtype and (ours[name].stride() == x.stride() or not compiled), name


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_offset_input_within_the_bound(offset, act):
    """Group means 100 and 1000 standard deviations off zero: the statistics are two-pass per channel and block,
    combined in fp64, and the mean is taken off in two fp32 parts, so nothing of the mean's size is rounded."""
    errors, _ = _errors_and_bounds((2, 64, 12, 10), 32, act, torch.float32, offset)
    over = {name: f"{e:.3g} > {b:.3g}" for name, (e, b) in errors.items() if not e <= b}
    assert not over, over


@pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, False), (False, False, True),
                                           (True, True, False), (False, True, True), (True, None, True),
                                           (False, None, True)],
                         ids=["dx", "dweight", "dbias", "dx-dweight", "dweight-dbias", "no-weight-dx-dbias",
                              "no-weight-dbias"])
@pytest.mark.parametrize("act", [None, "silu", "relu"])
def test_every_gradient_subset_matches_the_reference(act, requires_grad):
    """Exactly the gradients asked for, each within the fp32 bound of the reference's; a missing weight scales
    nothing (and the bias still enters the activation)."""
    x, weight, bias = _inputs((2, 24, 7, 9))
    weight = None if requires_grad[1] is None else weight
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def grads(backend, dtype):
        leaves = [None if t is None else t.to(dtype).requires_grad_(bool(need))
                  for t, need in zip((x, weight, bias), requires_grad)]
        with normlayers.backend(backend):
            y = NF.group_norm(leaves[0], 6, leaves[1], leaves[2], 1e-5, act)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            return dict(enumerate(torch.autograd.grad(y, wanted, dy.to(dtype))))

    ours, baseline, expected = (grads(backend, dtype) for backend, dtype in
                                (("auto", torch.float32), ("reference", torch.float32), ("reference", torch.float64)))
    assert len(ours) == len(expected) == sum(bool(need) for need in requires_grad)
    bounds = error_bounds(baseline, expected, torch.float32)
    for k, grad in ours.items():
        assert max_abs_error(grad, expected[k]) <= bounds[k], k


def test_the_compiled_path_runs_and_the_switch_turns_it_off(monkeypatch):
    """Channels-last fp32 under autograd runs the compiled Function; with ``NORMLAYERS_CPU_KERNELS=0`` the ATen path
    runs, with the same result within the fp32 tolerance."""
    x, weight, bias = (t.requires_grad_() for t in _inputs((2, 64, 8, 8)))
    y = NF.group_norm(x, 32, weight, bias, 1e-5, "silu")
    assert "CompiledGroupNorm" in y.grad_fn.name()
    monkeypatch.setattr(_native, "_ENABLED", False)  # as NORMLAYERS_CPU_KERNELS=0 at import
    y_aten = NF.group_norm(x, 32, weight, bias, 1e-5, "silu")
    assert "CompiledGroupNorm" not in y_aten.grad_fn.name()
    torch.testing.assert_close(y, y_aten)


def test_nan_stays_in_its_group():
    """A NaN in one (sample, group) makes that group's output and input gradient NaN, as ATen's group norm does, and
    leaves every other group finite."""
    x, weight, bias = _inputs((2, 16, 6, 6))
    x = x.detach().clone()
    x[1, 5, 2, 3] = float("nan")  # sample 1, group 2 of 4 (channels 4-7)
    x.requires_grad_()
    y = NF.group_norm(x, 4, weight, bias, 1e-5, "silu")
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x.detach(), 4, weight, bias, 1e-5))
    assert torch.equal(y.detach().isnan(), expected.isnan())
    assert y[1, 4:8].isnan().all() and not y[1, 8:].isnan().any() and not y[0].isnan().any()
    assert dx[1, 4:8].isnan().all() and not dx[0].isnan().any() and not dx[1, :4].isnan().any()


@pytest.mark.parametrize("shape, groups", [((3, 64, 17, 19), 32), ((3, 20, 9, 11), 5), ((3, 330, 30, 31), 33)],
                         ids=["C64", "C20", "C330"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_results_do_not_depend_on_the_thread_count(act, shape, groups):
    """Every partial sum belongs to a fixed block of positions and is added in a fixed order: one thread and two
    give the same bits (no atomics, no per-thread partials). Three samples run whole samples per thread on one thread
    and share out their blocks on two, where the passes walk rows instead of tiles: the same arithmetic in the same
    order (C = 20 and 330: a partial vector per row). At C = 330 a sample's 1.2 MB exceed a 1 MiB L2, where the
    forward's whole samples write the output four rows per step (930 positions: a last block of 34 rows)."""
    tensors = _inputs(shape)

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _results("auto", tensors, groups, act)
        finally:
            torch.set_num_threads(before)

    one, two = run(1), run(2)
    for name in NAMES:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_double_backward_runs_through_the_composite(dtype):
    """create_graph=True differentiates ATen's group norm and the activation (the saved statistics hold no graph),
    bf16 input in fp32 as the forward computes it."""
    x, weight, bias = (t.requires_grad_() for t in _inputs((1, 8, 4, 6), dtype=dtype))
    y = NF.group_norm(x, 2, weight, bias, 1e-5, "silu")
    dx, = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    (ddw,) = torch.autograd.grad(dx.float().square().sum(), weight)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    dx64, = torch.autograd.grad(ref.group_norm(x64, 2, w64, b64, 1e-5, "silu"), x64, torch.ones_like(x64),
                                create_graph=True)
    (ddw64,) = torch.autograd.grad(dx64.square().sum(), w64)
    # a second derivative, fp32 against fp64; bf16 rounds dx (and ddw) to 8 bits
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype is torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(ddw.double(), ddw64, **tolerance)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_failed_allocation_falls_back_to_aten(monkeypatch, training):
    """When the kernel reports that it could not allocate its scratch memory (returns −1), the ATen path gives the
    result: the Python path's kernel and the C++ entry's (handed one that fails) both fail here."""
    extension = _extension.module()
    addresses = _extension._kernel_addresses()
    failing = _FORWARD_SIGNATURE(lambda *args: -1)
    monkeypatch.setattr(cpu_group_norm, "_forward_kernel", lambda: failing)
    x, weight, bias = (t.requires_grad_(training) for t in _inputs((2, 64, 8, 8)))
    try:
        if extension is not None:
            extension.set_kernels(*addresses[:2], ctypes.cast(failing, ctypes.c_void_p).value, *addresses[3:])
        y = NF.group_norm(x, 32, weight, bias, 1e-5, None)
    finally:
        if extension is not None:
            extension.set_kernels(*addresses)
    expected = torch.nn.functional.group_norm(x, 32, weight, bias, 1e-5)
    torch.testing.assert_close(y, expected)
    if training:  # (the kernel's output is never written: only the fallback gives these)
        dy = torch.randn_like(y)
        for grad, grad_expected in zip(torch.autograd.grad(y, (x, weight, bias), dy),
                                       torch.autograd.grad(expected, (x, weight, bias), dy)):
            torch.testing.assert_close(grad, grad_expected)


# group_norm_cl_fwd's C signature
_FORWARD_SIGNATURE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_int)


def test_torch_func_and_compile_take_the_aten_path():
    """``torch.func.grad`` (wrapped tensors: no memory to hand to C) and ``torch.compile(fullgraph=True)`` (inductor
    compiles its own) run without the kernel and give eager's gradient and output."""
    x, weight, bias = _inputs((2, 64, 6, 6))

    def eager(t):
        return torch.nn.functional.silu(torch.nn.functional.group_norm(t, 32, weight, bias, 1e-5))

    ours = torch.func.grad(lambda t: NF.group_norm(t, 32, weight, bias, 1e-5, "silu").square().sum())(x)
    torch.testing.assert_close(ours, torch.func.grad(lambda t: eager(t).square().sum())(x))
    compiled = torch.compile(lambda t: NF.group_norm(t, 32, weight, bias, 1e-5, "silu"), fullgraph=True)
    torch.testing.assert_close(compiled(x), eager(x))
