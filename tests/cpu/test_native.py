"""The compiled CPU kernels' build and load (normlayers.cpu._native): cached, shared, and optional."""

from __future__ import annotations

import shutil

import pytest

from normlayers.cpu import _native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache directory, no library loaded in this process yet, the kernels on (whatever the environment)."""
    monkeypatch.setenv("NORMLAYERS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_ENABLED", True)
    monkeypatch.setattr(_native, "_LIBRARIES", {})
    monkeypatch.setattr(_native, "_FUNCTIONS", {})
    return tmp_path


SOURCES = sorted(p.stem for p in _native._CSRC.glob("*.c"))


@pytest.mark.skipif(_native._compiler() is None, reason="no C compiler on this machine: the ATen path runs")
@pytest.mark.parametrize("name", SOURCES)
def test_every_source_builds_and_is_cached(fresh, name, recwarn):
    """With a compiler, every kernel source compiles without a warning-turned-fallback, into the cache directory, and a
    second process (here: an emptied in-process table) loads the cached file instead of compiling again."""
    assert _native.load(name) is not None, [str(w.message) for w in recwarn]
    built = list(fresh.glob(f"{name}-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _native._LIBRARIES.clear()
    assert _native.load(name) is not None
    assert [p.stat().st_mtime_ns for p in fresh.glob(f"{name}-*.so")] == [stamp]


def test_disabled_by_the_environment(fresh, monkeypatch):
    monkeypatch.setattr(_native, "_ENABLED", False)  # as NORMLAYERS_CPU_KERNELS=0 at import
    assert _native.load(SOURCES[0]) is None
    assert _native.function(SOURCES[0], "anything", None) is None
    assert not list(fresh.iterdir())


def test_a_failed_build_warns_once_and_falls_back(fresh, monkeypatch, tmp_path_factory):
    """A compiler that fails gives ``None`` (the ATen path) with one warning naming the file, and no half-written
    library in the cache."""
    broken = tmp_path_factory.mktemp("bin") / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken-cc 1.0 && exit 0\n"
                      "echo 'no such flag' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(RuntimeWarning, match=f"{SOURCES[0]}.c"):
        assert _native.load(SOURCES[0]) is None
    assert _native.load(SOURCES[0]) is None  # cached: no second warning (pytest.warns would not see it anyway)
    assert not list(fresh.glob("*.so"))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_no_compiler_means_the_aten_path(fresh, monkeypatch):
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert _native.load(SOURCES[0]) is None


def test_a_failed_autograd_node_build_warns_once_and_the_python_function_runs(monkeypatch):
    """Where the C++ autograd node cannot be built, ``module()`` warns once and returns ``None``, and a training call
    runs the Python Function around the same kernels, with the node's results."""
    import torch

    from normlayers import functional as NF
    from normlayers.cpu import _extension

    if _native.load("group_norm_nchw") is None:
        pytest.skip("no C compiler: neither the kernels nor their node run")
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    node = _extension.module()
    y_node = NF.group_norm(x, 4, act="silu")
    (dx_node,) = torch.autograd.grad(y_node, x, torch.ones_like(y_node))

    def fail():
        raise RuntimeError("no ninja here")

    monkeypatch.setattr(_extension, "_MODULE", [])
    monkeypatch.setattr(_extension, "_build", fail)
    with pytest.warns(RuntimeWarning, match="autograd node"):
        assert _extension.module() is None
    assert _extension.module() is None  # (once: the failure is remembered)
    y = NF.group_norm(x, 4, act="silu")
    assert y.grad_fn.name() == "_CompiledGroupNormFunctionBackward"
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    if node is not None:
        assert "CompiledGroupNorm" in y_node.grad_fn.name() and y_node.grad_fn.name() != y.grad_fn.name()
        torch.testing.assert_close(y, y_node, rtol=0, atol=0)  # the same kernel's forward
        torch.testing.assert_close(dx, dx_node, rtol=0, atol=0)  # and backward
