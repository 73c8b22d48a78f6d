"""Every RMS/layer norm class of the installed transformers: a swap by replace_norms is bit-for-bit, in each dtype.

The classes are discovered, not listed: each ``transformers.models.*.modeling_*`` module that imports, each class
named ``*RMSNorm``/``*LayerNorm`` that builds from a width and whose output, in fp64 with random parameters, is an
elementwise affine of the RMS- or layer-normalized input (fitted per column by least squares, so the test does not
assume any form of the affine: ``w``, ``1 + w``, ``w`` and ``b``, none).
"""

from __future__ import annotations

import copy
import importlib
import pathlib
import re
import time
import warnings

import pytest
import torch
from torch import nn

import normlayers

transformers = pytest.importorskip("transformers")

_WIDTH = 24
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _norm_classes() -> list[type]:
    import transformers.models as models

    # Only the modeling files that define a class with such a name are imported (half of them): importing is what
    # takes the time here.
    defines_a_norm = re.compile(r"^\s*class \w+(RMSNorm|LayerNorm)\(", re.MULTILINE)
    found: dict[str, type] = {}
    for path in sorted(pathlib.Path(models.__path__[0]).glob("*/modeling_*.py")):
        if not defines_a_norm.search(path.read_text(encoding="utf-8")):
            continue
        name = f"{models.__name__}.{path.parent.name}.{path.stem}"
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 — an optional dependency of one model is missing
            continue
        for class_name, cls in vars(module).items():
            if (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == name
                    and class_name.endswith(("RMSNorm", "LayerNorm"))):
                found[f"{name}.{class_name}"] = cls
    return [found[key] for key in sorted(found)]


def _build(cls: type) -> nn.Module | None:
    for args, kwargs in (((_WIDTH,), {}), ((), {"hidden_size": _WIDTH}), ((), {"dim": _WIDTH})):
        try:
            module = cls(*args, **kwargs)
        except Exception:  # noqa: BLE001 — another constructor signature (a config, several widths): not a plain norm
            continue
        if isinstance(module, nn.Module) and not list(module.children()):
            return module
    return None


def _randomize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return module


def _is_affine_of(y: torch.Tensor, normalized: torch.Tensor) -> bool:
    """Whether ``y[:, j] = a_j · normalized[:, j] + c_j`` for some per-column ``a, c`` (least squares, fp64)."""
    design = torch.stack([normalized, torch.ones_like(normalized)], dim=-1).transpose(0, 1)  # (width, rows, 2)
    solution = torch.linalg.lstsq(design, y.transpose(0, 1).unsqueeze(-1)).solution
    fitted = (design @ solution).squeeze(-1).transpose(0, 1)
    return bool((fitted - y).abs().max() <= 1e-6 * y.abs().max().clamp_min(1.0))


def _row_norm_kind(module: nn.Module) -> str | None:
    """``"rms"`` or ``"layer"`` if the module computes that norm (up to an elementwise affine), else None."""
    generator = torch.Generator().manual_seed(0)
    probe = _randomize(copy.deepcopy(module).double(), generator)
    x = torch.randn(32, _WIDTH, generator=generator, dtype=torch.float64) * 3 + 1
    try:
        with torch.no_grad():
            y = probe(x)
    except Exception:  # noqa: BLE001 — does not take one (rows, width) input
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    rms = x * torch.rsqrt(x.square().mean(-1, keepdim=True))
    centred = x - x.mean(-1, keepdim=True)
    layer = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True))
    if _is_affine_of(y, rms):
        return "rms"
    return "layer" if _is_affine_of(y, layer) else None


@pytest.fixture(scope="module")
def hf_row_norms() -> dict[str, tuple[nn.Module, str]]:
    start = time.perf_counter()
    norms = {}
    for cls in _norm_classes():
        module = _build(cls)
        kind = _row_norm_kind(module) if module is not None else None
        if kind is not None:
            norms[f"{cls.__module__}.{cls.__qualname__}"] = (module, kind)
    print(f"\n{len(norms)} row-norm classes discovered in transformers {transformers.__version__} "
          f"in {time.perf_counter() - start:.1f} s")
    return norms


def test_every_swap_of_a_hugging_face_norm_is_bit_for_bit(hf_row_norms):
    assert hf_row_norms, "no RMS/layer norm class found in transformers"
    generator = torch.Generator().manual_seed(1)
    swapped, left, mismatched = [], {}, []
    for name, (module, kind) in hf_row_norms.items():
        for dtype in _DTYPES:
            original = _randomize(copy.deepcopy(module), generator).to(dtype)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                new = normlayers.replace_norms(copy.deepcopy(original), strict=False)
            if not _is_ours(new):
                left[name] = kind + ": " + "; ".join(str(w.message) for w in caught)
                break
            x = torch.randn(4, 5, _WIDTH, generator=generator).to(dtype)
            with torch.no_grad(), normlayers.backend("reference"):
                expected, actual = original(x), new(x)
            if not (actual.dtype == expected.dtype and torch.equal(actual, expected)):
                mismatched.append(f"{name} in {dtype}: {(actual != expected).float().mean():.1%} of outputs differ")
        else:
            swapped.append(name)
    print(f"swapped bit-for-bit: {len(swapped)}; left alone: {len(left)}")
    for name, why in left.items():
        print(f"  left alone {name} ({why})")
    assert not mismatched, "\n".join(mismatched)
    assert swapped


def _is_ours(module: nn.Module) -> bool:
    return type(module).__module__.startswith("normlayers.")
