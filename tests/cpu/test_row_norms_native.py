"""The compiled LayerNorm (csrc/row_norms.c) that the CPU tier runs for inference and, forward and backward, inside its
Function: against the fp64 reference at edge shapes and dtypes, its trust check, and the ATen path it falls back to."""

from __future__ import annotations

import pytest
import torch

import normlayers
import normlayers.functional as NF
from normlayers.cpu import _native
from normlayers.cpu import row_norms as cpu_row
from normlayers.reference import row_norms as ref_row
from normlayers.testing import assert_close, assert_lowprec_close

from .conftest import use_autograd_node

pytestmark = pytest.mark.skipif(_native.load("row_norms") is None,
                                reason="the compiled CPU kernels are off or unavailable here")


def _spy(monkeypatch, name, taken):
    """Patch ``cpu_row.<name>`` to record, per call, whether ``taken(result)`` (the kernel's result was used)."""
    calls = []
    original = getattr(cpu_row, name)

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(taken(result))
        return result

    monkeypatch.setattr(cpu_row, name, spy)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many forward calls reached the compiled kernel and returned its result."""
    return _spy(monkeypatch, "_native_row_norm", lambda result: result is not None and result[0] is not None)


def _reference(x, w, b, eps=1e-5):
    return ref_row.layer_norm(x.double(), (x.shape[-1],), None if w is None else w.double(),
                              None if b is None else b.double(), eps)


def _check(y, x, w, b, eps=1e-5):
    """The bench's rule: at most twice as far from the fp64 reference as the reference run in the input's dtype
    (fp32 statistics), plus the dtype's atol; offset rows make even that reference err by ~1e-4 at fp32."""
    n = x.shape[-1]
    low = ref_row.layer_norm(x, (n,), w, b, eps, out_dtype=x.dtype)
    assert_lowprec_close(y, low, _reference(x, w, b, eps))


# one row, widths below one vector, odd, one vector and a tail, and wider than a summation block (1024)
SHAPES = [(1, 2), (3, 7), (5, 16), (4, 33), (2, 3, 96), (3, 1031), (2, 5000)]


@pytest.mark.parametrize("params", ["both", "weight", "bias", "none", "fp32_params"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inference_matches_reference(shape, dtype, params, kernel_calls):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    n = shape[-1]
    pdtype = torch.float32 if params == "fp32_params" else dtype
    w = (1 + 0.2 * torch.randn(n, generator=gen)).to(pdtype) if params != "bias" and params != "none" else None
    b = (0.5 * torch.randn(n, generator=gen)).to(pdtype) if params != "weight" and params != "none" else None
    with torch.no_grad():
        y = NF.layer_norm(x, (n,), w, b)
    assert kernel_calls == [True]
    assert y.dtype == dtype and y.shape == x.shape
    _check(y, x, w, b)


@pytest.mark.parametrize("case", ["sorted", "offset", "constant", "tiny"])
def test_moments_stay_accurate(case, kernel_calls):
    """The one-read moments are taken about the mean of a row's first values: a sorted row puts that far from the
    mean (the centred second pass runs), a large offset and a constant row test the cancellation it must avoid."""
    gen = torch.Generator().manual_seed(1)
    x = {"sorted": torch.linspace(-3, 50, 4 * 777).reshape(4, 777),
         "offset": 1000 + torch.randn(4, 777, generator=gen),
         "constant": torch.full((4, 777), 3.25),
         "tiny": 1e-20 * torch.randn(4, 777, generator=gen)}[case]
    with torch.no_grad():
        y = NF.layer_norm(x, (777,))
    assert kernel_calls == [True]
    _check(y, x, None, None)


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_untrusted_rows_take_the_reference_path(bad, kernel_calls):
    """A row with NaN/inf gives NaN there (as the reference); a row whose variance overflows fp32 is not the bias
    (ATen's answer) but the reference's, through the scaled statistics."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    x[1, 5] = {"nan": float("nan"), "inf": float("inf"), "overflow": 3e19}[bad]
    if bad == "overflow":
        x[1] *= 1e19
    b = torch.full((40,), 0.25)
    with torch.no_grad():
        y = NF.layer_norm(x, (40,), None, b)
    assert kernel_calls and not any(kernel_calls)
    with normlayers.backend("reference"):
        expected = NF.layer_norm(x, (40,), None, b)
    torch.testing.assert_close(y, expected, equal_nan=True)
    assert torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_untrusted_rows_in_training_take_the_python_function(bad, autograd_node):
    """Under autograd too, rows whose statistics the kernel does not trust leave it: the C++ node hands the call to
    the Python Function (the scaled statistics), whose output and gradient are the reference's."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    x[1, 5] = float("nan") if bad == "nan" else 3e19
    if bad == "overflow":
        x[1] *= 1e19
    w = torch.full((40,), 1.5)
    xl = x.clone().requires_grad_()
    y = NF.layer_norm(xl, (40,), w)
    assert y.grad_fn.name() == "_RowNormFunctionBackward"
    y.backward(torch.ones_like(y))
    xr = x.clone().requires_grad_()
    with normlayers.backend("reference"):
        yr = NF.layer_norm(xr, (40,), w)
        yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, equal_nan=True)
    torch.testing.assert_close(xl.grad[[0, 2]], xr.grad[[0, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_threads_agree(dtype, kernel_calls):
    """Rows are split between threads, each row computed by one: bit-equal results at any thread count."""
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(3)).to(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(NF.layer_norm(x, (300,)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert all(kernel_calls)


def test_not_taken_for_what_it_does_not_read(kernel_calls):
    """fp16 and fp64 rows and non-contiguous rows run ATen's kernel (same results)."""
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for rows, w, b in ((x.half(), None, None), (x.double(), None, None), (x.t().contiguous().t(), None, None)):
            y = NF.layer_norm(rows, (rows.shape[-1],), w, b)
            if rows.dtype == torch.float16:
                assert_lowprec_close(y, torch.nn.functional.layer_norm(rows, (24,), w, b), _reference(rows, w, b))
            else:
                assert_close(y, _reference(rows, w, b), dtype=rows.dtype)
    assert not any(kernel_calls)


@pytest.mark.parametrize("kernels", [True, False], ids=["compiled", "aten"])
def test_parameters_of_two_dtypes(kernels, monkeypatch):
    """bf16 rows with an fp32 weight and a bf16 bias: both parameters are read in fp32 (ATen's kernel refused the mix
    with "mixed dtype (CPU): expect parameter to have scalar type of Float")."""
    monkeypatch.setattr(_native, "_ENABLED", kernels)
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(5)).bfloat16()
    w, b = 1 + 0.1 * torch.randn(24, generator=torch.Generator().manual_seed(6)), torch.full((24,), 0.5).bfloat16()
    with torch.no_grad():
        y = NF.layer_norm(x, (24,), w, b)
    _check(y, x, w, b.float())


@pytest.fixture(params=["cpp", "python"])
def autograd_node(request, monkeypatch):
    """A training test with the C++ autograd node of the kernels (their default) and with the Python Function (where
    the node cannot be built): the spies see the Python one's kernel calls only."""
    use_autograd_node(request.param, monkeypatch)
    return request.param


def _node_name(x, w, b):
    y = NF.layer_norm(x.detach().clone().requires_grad_(), (x.shape[-1],), w, b)
    return y.grad_fn.name()


@pytest.fixture
def backward_calls(monkeypatch):
    return _spy(monkeypatch, "_native_layer_norm_backward", lambda result: result is not None)


def _grads(x, w, b, dy, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    it = iter(leaves)
    xl, wl, bl = next(it), (next(it) if w is not None else None), (next(it) if b is not None else None)
    with normlayers.backend(backend):
        y = NF.layer_norm(xl, (x.shape[-1],), wl, bl)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("params", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_matches_reference(shape, dtype, params, kernel_calls, backward_calls, autograd_node):
    """Output and every gradient against fp64, within the bench's rule (twice the reference's own error in the
    input's dtype, plus the dtype's atol; the weight and bias gradients are sums over all rows)."""
    gen = torch.Generator().manual_seed(7)
    n = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 - 1).to(dtype)
    w = (1 + 0.2 * torch.randn(n, generator=gen)).to(dtype) if params in ("both", "weight") else None
    b = (0.5 * torch.randn(n, generator=gen)).to(dtype) if params in ("both", "bias") else None
    dy = torch.randn(shape, generator=gen).to(dtype)
    ours = _grads(x, w, b, dy, "auto")
    low = _grads(x, w, b, dy, "reference")
    exact = _grads(x.double(), None if w is None else w.double(), None if b is None else b.double(), dy.double(),
                   "reference")
    if autograd_node == "python":
        assert kernel_calls == [True] and backward_calls == [True]
    else:
        assert "CompiledLayerNorm" in _node_name(x, w, b)
    for i, (a, lo, ex) in enumerate(zip(ours, low, exact)):
        assert a.dtype == lo.dtype, i
        assert_lowprec_close(a, lo, ex, msg=f"result {i}")


def test_gradient_subsets_and_a_strided_gradient(backward_calls, autograd_node):
    """Only the gradients asked for are computed; a gradient that is not contiguous (here: of ``y.sum()``, expanded)
    takes ATen's backward in the Python Function (the C++ node makes it contiguous for the kernel), with the same
    values."""
    python = autograd_node == "python"
    gen = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(9, 50, generator=gen), torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    for wanted in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        leaves = [t.clone().requires_grad_(need) for t, need in zip((x, w, b), wanted)]
        y = NF.layer_norm(leaves[0], (50,), leaves[1], leaves[2])
        y.backward(torch.randn(9, 50, generator=gen))
        assert [t.grad is not None for t in leaves] == list(wanted)
    assert all(backward_calls) and bool(backward_calls) == python
    backward_calls.clear()
    xl = x.clone().requires_grad_()
    NF.layer_norm(xl, (50,), w, b).sum().backward()
    assert backward_calls == ([False] if python else [])
    xr = x.clone().requires_grad_()
    with normlayers.backend("reference"):
        NF.layer_norm(xr, (50,), w, b).sum().backward()
    assert_close(xl.grad, xr.grad)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_standardization_inference(dtype, offset, kernel_calls):
    """Weight Standardization's forward without a gradient runs the same kernel over the filters (its fan-in rows);
    filters far from zero stay within the bound (the kernel centres every row)."""
    gen = torch.Generator().manual_seed(9)
    weight = (offset + torch.randn(16, 8, 3, 3, generator=gen)).to(dtype)
    with torch.no_grad():
        ours = NF.weight_standardize(weight)
        assert kernel_calls == [True]
        with normlayers.backend("reference"):
            low = NF.weight_standardize(weight)
            exact = NF.weight_standardize(weight.double())
    assert_lowprec_close(ours, low, exact)


def test_plain_rms_norm_keeps_torch_s_order(kernel_calls):
    """A plain RMSNorm is not taken by the kernel: its op order is torch's and Hugging Face's, so a swapped Llama's
    norms give the same bits (tests/examples); the kernel's blocked sums would differ in the last bit."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(14))
    w = torch.randn(64, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        y = NF.rms_norm(x, (64,), w, eps=1e-6)
    assert not any(kernel_calls)
    assert torch.equal(y, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))


@pytest.mark.parametrize("kind", ["layer", "rms", "rms_offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (2, 3, 1031)], ids=str)
def test_fused_add_inference(shape, dtype, kind, kernel_calls):
    """``add_layer_norm`` / ``add_rms_norm`` without gradients: ``h = x + residual`` (rounded once to the dtype) and
    the norm of that stored ``h``, from one pass of the kernel (RMSNorm also with a Gemma-style ``w + 1``, widened to
    fp32 first)."""
    gen = torch.Generator().manual_seed(12)
    n = shape[-1]
    offset = 1.0 if kind == "rms_offset" else 0.0
    x, r = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.2 * torch.randn(n, generator=gen)).to(dtype)
    with torch.no_grad():
        if kind == "layer":
            y, h = NF.add_layer_norm(x, r, (n,), w, w)
        else:
            y, h = NF.add_rms_norm(x, r, (n,), w, weight_offset=offset)
    assert kernel_calls == [True]
    expected_h = (x.float() + r.float()).to(dtype)  # added in fp32, rounded once
    assert torch.equal(h, expected_h)
    if kind == "layer":
        low = ref_row.layer_norm(h, (n,), w, w, 1e-5, out_dtype=dtype)
        exact = ref_row.layer_norm(h.double(), (n,), w.double(), w.double(), 1e-5)
    else:
        eps = torch.finfo(torch.float32).eps
        low = ref_row.rms_norm(h, (n,), w, eps, weight_offset=offset, out_dtype=dtype)
        exact = ref_row.rms_norm(h.double(), (n,), w.double(), eps, weight_offset=offset)
    assert_lowprec_close(y, low, exact)


def test_rms_rows_that_overflow_take_the_scaled_path(kernel_calls):
    """A row whose mean square overflows fp32 (rstd = 0 in the kernel) is normalized through the scaled statistics,
    and ``h`` is still ``x + residual``."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(13))
    x[1] *= 1e25
    r = torch.randn(3, 40, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        y, h = NF.add_rms_norm(x, r, (40,))
        with normlayers.backend("reference"):
            expected_y, expected_h = NF.add_rms_norm(x, r, (40,))
    assert kernel_calls[0] is False
    assert torch.equal(h, expected_h)
    assert_close(y, expected_y)
