"""normlayers.set_backend / get_backend / backend() and NORMLAYERS_BACKEND (DESIGN.md, "The three tiers")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import normlayers
import normlayers.backends as nb
import normlayers.cpu.row_norms as cpu_row
import normlayers.ops.row_norms as ops_row
from normlayers import functional as NF
from normlayers.reference import row_norms as ref_row
from normlayers.testing import assert_close


@pytest.mark.parametrize("name", ["auto", "triton", "reference"])
def test_set_and_get(name):
    normlayers.set_backend(name)
    assert normlayers.get_backend() == name


def test_default_is_auto_in_this_test_session():
    # conftest starts every test on the import-time value; these tests run without NORMLAYERS_BACKEND
    if "NORMLAYERS_BACKEND" in os.environ:
        pytest.skip("NORMLAYERS_BACKEND is set for this run")
    assert normlayers.get_backend() == "auto"


def test_context_manager_sets_and_restores():
    normlayers.set_backend("triton")
    with normlayers.backend("reference"):
        assert normlayers.get_backend() == "reference"
        with normlayers.backend("auto"):
            assert normlayers.get_backend() == "auto"
        assert normlayers.get_backend() == "reference"
    assert normlayers.get_backend() == "triton"


def test_context_manager_restores_on_exception():
    normlayers.set_backend("triton")
    with pytest.raises(KeyError):
        with normlayers.backend("reference"):
            assert normlayers.get_backend() == "reference"
            raise KeyError("boom")
    assert normlayers.get_backend() == "triton"


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None, 1])
def test_invalid_name(bad):
    normlayers.set_backend("reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        normlayers.set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with normlayers.backend(bad):
            pass
    assert normlayers.get_backend() == "reference"  # unchanged by the failed calls


def _import_in_subprocess(env_value):
    env = dict(os.environ)
    env.pop("NORMLAYERS_BACKEND", None)
    if env_value is not None:
        env["NORMLAYERS_BACKEND"] = env_value
    return subprocess.run([sys.executable, "-c", "import normlayers; print(normlayers.get_backend())"],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["reference", "triton", "auto", None])
def test_env_var_is_read_at_import(value):
    proc = _import_in_subprocess(value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (value or "auto")


def test_invalid_env_var_fails_at_import_naming_the_variable():
    proc = _import_in_subprocess("bogus")
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]  # the exception line (the traceback above quotes source lines)
    assert message.startswith("ValueError") and "bogus" in message, proc.stderr
    # the user set an environment variable, not an argument: the message must say which one
    assert "NORMLAYERS_BACKEND" in message, message


@pytest.mark.parametrize("interpret", [None, "0", ""])
def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch, interpret):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    x = torch.randn(2, 8)
    normlayers.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nb.use_triton(x)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on a cpu tensor"):
        NF.layer_norm(x, (8,))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        normlayers.RMSNorm(8)(x)
    # the other backends still run on CPU
    for name in ("auto", "reference"):
        with normlayers.backend(name):
            assert_close(NF.layer_norm(x, (8,)), torch.nn.functional.layer_norm(x, (8,)))


class _OpCalled(Exception):
    pass


def _fail(*args, **kwargs):
    raise _OpCalled


@pytest.mark.parametrize("kind", ["layer", "rms", "crms"])
def test_auto_on_cpu_uses_the_cpu_tier(monkeypatch, kind):
    """Backend "auto" on CPU runs the CPU tier (never the kernels); "reference" runs the reference."""
    monkeypatch.setattr(ops_row, "row_norm", _fail)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    fn = {"layer": NF.layer_norm, "rms": NF.rms_norm, "crms": NF.crms_norm}[kind]
    add_fn = {"layer": NF.add_layer_norm, "rms": NF.add_rms_norm, "crms": NF.add_crms_norm}[kind]
    ref = {"layer": ref_row.layer_norm, "rms": ref_row.rms_norm, "crms": ref_row.crms_norm}[kind]
    # the patch is seen: the "triton" backend goes through the op (so the check below can fail)
    with normlayers.backend("triton"):
        with pytest.raises(_OpCalled):
            fn(x, (16,))
    with normlayers.backend("auto"):
        assert nb.use_triton(x) is False and nb.tier(x) == "cpu"
        y = fn(x, (16,), None, eps=1e-5)
        assert torch.equal(y, cpu_row.row_norm(kind, x, (16,), None, None, 1e-5, None, None, 0.0)[0])
        assert_close(y, ref(x, (16,), None, eps=1e-5))
        y, h = add_fn(x, r, (16,), None, eps=1e-5)
        assert torch.equal(h, x + r)
        assert_close(y, ref(x + r, (16,), None, eps=1e-5))
    with normlayers.backend("reference"):
        assert nb.tier(x) == "reference"
        assert torch.equal(fn(x, (16,), None, eps=1e-5), ref(x, (16,), None, eps=1e-5))
        y, h = add_fn(x, r, (16,), None, eps=1e-5)
        assert torch.equal(y, ref(x + r, (16,), None, eps=1e-5))


def test_auto_never_uses_triton_off_cuda():
    normlayers.set_backend("auto")
    assert nb.use_triton(torch.empty(2, device="meta")) is False
    assert nb.use_triton(torch.empty(2)) is False
