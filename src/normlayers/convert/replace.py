"""``replace_norms``, ``plan_replacements`` and ``restore_norms``: swap a model's norms for normlayers' in place.

The new module is built by its class's ``from_module`` on the ``meta`` device and *adopts* the old module's Parameter
and buffer objects (torchao's ``from_float`` pattern), so device, dtype, ``requires_grad``, weight tying and optimizer
references survive and ``state_dict`` keys stay the same; ``training`` is copied; a module reachable under several
names becomes one new module; only exact source types (or subclasses that keep the parent's ``forward``) are swapped
(the ``convert_sync_batchnorm`` subclass bug, pytorch#187298, timm#1254); wrapped models are refused (replace →
DDP/FSDP → compile). timm's norm classes are known by type when timm is imported (timm stays optional: it is never
imported here unless :func:`timm_mapping` is called).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from normlayers import nn as normlayers_nn
from normlayers.backends import backend as normlayers_backend
from normlayers.nn._adopt import adopt, factory_kwargs_of
from normlayers.nn.group_norm import GroupNorm
from normlayers.nn.row_norms import LayerNorm, RMSNorm

__all__ = ["DEFAULT_MAPPING", "Replacement", "plan_replacements", "replace_norms", "restore_norms", "timm_mapping"]

logger = logging.getLogger("normlayers")

Target = Union[type, "functools.partial[nn.Module]", Callable[[nn.Module], nn.Module]]
MappingLike = Mapping[Union[type, str], Target]

# Same math only: these swaps change the speed, never the outputs. A string key is an fnmatch pattern on the class
# name, matched whatever the case, for Hugging Face's norm classes (about 230), none of which subclasses nn.RMSNorm:
# "*RMSNorm" takes the RMS norms (and refuses the ones RMSNorm cannot reproduce), "*LayerNorm" the RMS norms named
# LayerNorm (T5's), leaving the real layer norms alone. Which variant (offset, casting order) is found by probing each
# class. When timm is imported, replace_norms(model) adds timm_mapping()'s entries.
DEFAULT_MAPPING: dict[Union[type, str], Target] = {
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.GroupNorm: GroupNorm,
    "*RMSNorm": RMSNorm,
    "*LayerNorm": RMSNorm,
}


# timm's classes (timm/layers/norm.py, evo_norm.py, std_conv.py) → the normlayers class computing the same function,
# with the keywords that select it. timm's RmsNorm computes in the input's dtype: its type key binds RMSNorm's one
# variant, so it is verified in the model's dtype instead of probed in every dtype. A target normlayers lacks (a class
# of a later version) is reported as skipped.
_TIMM_TARGETS: dict[str, tuple[str, dict[str, Any]]] = {
    "LayerNorm": ("LayerNorm", {}),
    "LayerNorm2d": ("LayerNorm2d", {}),
    "RmsNorm": ("RMSNorm", {"weight_offset": 0.0, "cast_mode": "torch"}),
    "RmsNorm2d": ("RMSNorm2d", {}),
    # GroupNorm's from_module reads the *Act classes' activation module into `act`
    **{name: ("GroupNorm", {}) for name in ("GroupNorm", "GroupNorm1", "GroupNormAct", "GroupNorm1Act")},
    "StdConv2d": ("WSConv2d", {}),
    "ScaledStdConv2d": ("ScaledWSConv2d", {}),
    **{f"EvoNorm2d{variant}": (f"EvoNorm2d{variant}", {})
       for variant in ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")},
}


def _timm_entries(timm_layers: Any) -> tuple[dict[type, Target], dict[type, str]]:
    """The mapping for the timm classes ``timm_layers`` (the module ``timm.layers``) has, and the timm classes with
    no normlayers class in this version, with the reason."""
    mapping: dict[type, Target] = {}
    missing: dict[type, str] = {}
    for timm_name, (ours, keywords) in _TIMM_TARGETS.items():
        source = getattr(timm_layers, timm_name, None)
        if not isinstance(source, type):
            continue
        target = getattr(normlayers_nn, ours, None)
        if target is None:
            missing[source] = f"timm's {timm_name}: this version of normlayers has no {ours}"
        else:
            mapping[source] = functools.partial(target, **keywords) if keywords else target
    return mapping, missing


def timm_mapping() -> dict[type, Target]:
    """The entries :func:`replace_norms` adds to :data:`DEFAULT_MAPPING` for timm's norm classes when timm is
    imported: timm's ``LayerNorm``, ``RmsNorm``, ``LayerNorm2d``, ``RmsNorm2d``, ``GroupNorm``, ``GroupNorm1``,
    ``GroupNormAct``, ``GroupNorm1Act`` (their activation fused), the nine ``EvoNorm2d*``, ``StdConv2d`` and
    ``ScaledStdConv2d`` → the normlayers class computing the same function (as far as this version has one).
    Merge it into a mapping of your own to keep timm's swaps beside functional ones::

        >>> mapping = {**DEFAULT_MAPPING, **timm_mapping(), nn.BatchNorm2d: partial(BatchChannelNorm2d, num_groups=8)}

    Imports timm (``ImportError`` if it is not installed)."""
    return _timm_entries(importlib.import_module("timm.layers"))[0]


def _default_mapping() -> tuple[MappingLike, dict[type, str]]:
    """:data:`DEFAULT_MAPPING`, with timm's entries when timm is imported (a model holding timm modules has imported
    it; timm is not imported here), and the known timm classes that have no target."""
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is None:
        return DEFAULT_MAPPING, {}
    timm_entries, missing = _timm_entries(timm_layers)
    return {**DEFAULT_MAPPING, **timm_entries}, missing


@dataclass(frozen=True)
class Replacement:
    """One line of :func:`plan_replacements`: the module at ``fqn`` (also reachable as ``aliases``) of type
    ``old_type`` becomes a ``new_type`` (``None`` when the target is a callable, whose result type is known only
    when it runs), or, with ``skipped``, is left alone (a norm-like module the mapping does not take, or, with
    ``strict=False``, a refused one); and why."""

    fqn: str
    old_type: type
    new_type: Optional[type]
    reason: str
    aliases: tuple[str, ...] = ()
    skipped: bool = False


@dataclass(frozen=True)
class _RestoreRecord:
    """How to rebuild the module a same-math swap replaced: its class, its plain attributes and its submodules
    (timm's ``GroupNormAct`` calls its ``act`` and ``drop``)."""

    cls: type
    attributes: dict[str, Any]
    children: dict[str, nn.Module] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------------------


def _is_ours(module: nn.Module) -> bool:
    return type(module).__module__.startswith("normlayers.")


def _target_class(target: Target) -> Optional[type]:
    if isinstance(target, functools.partial):
        target = target.func
    return target if isinstance(target, type) else None


def _overrides_forward(cls: type, base: type) -> bool:
    return getattr(cls, "forward", None) is not getattr(base, "forward", None)


def _look_alike_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` (matched by its class name) is not a plain norm a normlayers class could take over, or None."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    buffers = [name for name, _ in module.named_buffers(recurse=False)]
    children = [name for name, _ in module.named_children()]
    if not set(names) <= {"weight", "bias"} or buffers or children:
        return (f"it holds parameters {names}, buffers {buffers} and submodules {children}, not just a `weight` "
                f"parameter (and `bias`)")
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if len(params) != 1:
        return f"its forward takes {[p.name for p in params]} (a gated or extra-argument norm), not one input"
    return None


# torch's norm classes; with any class whose name contains "norm" (any case) holding parameters or buffers of its own,
# the modules plan_replacements reports when it leaves them alone
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)


def _is_norm_like(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_NORMS):
        return True
    holds_tensors = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False))
    return holds_tensors and "norm" in type(module).__name__.lower()


def _name_matches(cls: type, pattern: str) -> bool:
    """Whether the class name matches the fnmatch ``pattern``, whatever the case (timm's ``RmsNorm``, Hugging
    Face's ``RMSNorm``)."""
    return fnmatch.fnmatchcase(cls.__name__.lower(), pattern.lower())


def _match(module: nn.Module, mapping: MappingLike) -> tuple[Optional[Target], str, Optional[str]]:
    """The target for ``module``, the reason, and the class-name pattern that matched (``None`` for a type key), or
    ``(None, reason, None)``; raises ``_Refused`` for refusals."""
    cls = type(module)
    if cls in mapping:
        return mapping[cls], f"mapped type {cls.__name__}", None
    if _is_ours(module):
        return None, "already a normlayers module", None
    for key, target in mapping.items():
        if isinstance(key, type) and isinstance(module, key):
            if _overrides_forward(cls, key):
                raise _Refused(f"{cls.__name__} subclasses {key.__name__} but overrides forward; swapping it would "
                               f"drop that behaviour. Map {cls.__name__} explicitly, exclude it, or pass strict=False "
                               f"to leave it alone")
            return target, f"subclass of {key.__name__} with its forward", None
    for key, target in mapping.items():
        if isinstance(key, str) and _name_matches(cls, key):
            return target, f"class name matches {key!r}", key
    return None, "the mapping has no entry for it", None


_ProbeCache = dict[tuple, tuple[Optional[dict], str]]


def _resolve(module: nn.Module, target: Target, pattern: Optional[str], cache: _ProbeCache) -> Target:
    """``target`` bound to the constructor variant that reproduces ``module`` bit-for-bit, found by probing the
    module's behaviour; ``target`` itself when there is nothing to choose (a type key, one variant: verification
    checks it). A module matched by a class-name pattern must be a plain norm the target reproduces. If not, a
    pattern naming the target's kind (``"*RMSNorm"`` for RMSNorm) refuses it (``_Refused``); another pattern
    (``"*LayerNorm"`` for RMSNorm: T5's RMS norm is named LayerNorm) just does not take it (``_NotTaken``)."""
    cls = _target_class(target)
    variants = _variants(target)
    if cls is None or (pattern is None and len(variants) == 1):
        return target
    problem = _look_alike_problem(module) if pattern is not None else None
    if problem is None:
        names = tuple(name for name, _ in module.named_parameters(recurse=False))
        key = (type(module), names, cls, repr(variants))
        if key not in cache:
            cache[key] = _reproduction(module, cls, variants)
        kwargs, why = cache[key]
        if kwargs is not None:
            return functools.partial(cls, **kwargs)
        problem = (f"replacing it by {cls.__name__} changes its outputs with every variant tried ({why}; probed "
                   f"bit-for-bit with random parameters in {', '.join(str(d) for d in _PROBE_DTYPES)})")
    if pattern is not None and not pattern.lower().endswith(cls.__name__.lower()):
        raise _NotTaken(f"its class name matches {pattern!r} but {problem}")
    raise _Refused(f"{type(module).__name__} looks like a norm but {problem}. Map it explicitly, exclude it, or pass "
                   f"strict=False to leave it alone")


class _Refused(Exception):
    pass


class _NotTaken(Exception):
    """A module a class-name pattern matched that the pattern's target does not compute: left alone, reported."""


# ----------------------------------------------------------------------------------------------------------------------
# Probing a look-alike: which class and variant computes what it computes
# ----------------------------------------------------------------------------------------------------------------------

# What a class computes is found by running it, not by reading its name or source. A fresh module's weight is ones
# (Llama) or zeros (Gemma), which hides both the rounding order and the offset, so the probe runs a CPU copy with
# random parameters, in each dtype a model runs in, on rows of which one is small enough for eps to matter.
_PROBE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _variants(target: Target) -> list[dict[str, Any]]:
    """The constructor keywords to try for a class target: its ``conversion_variants`` under the keywords a partial
    binds (the partial wins), without repeats."""
    bound = dict(target.keywords) if isinstance(target, functools.partial) else {}
    variants: list[dict[str, Any]] = []
    for variant in getattr(_target_class(target), "conversion_variants", ({},)):
        kwargs = {**variant, **bound}
        if kwargs not in variants:
            variants.append(kwargs)
    return variants


def _probe_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` with random parameters (and its class's behaviour)."""
    probe = copy.deepcopy(module)
    probe = probe.to_empty(device="cpu") if any(t.is_meta for t in probe.parameters()) else probe.cpu()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in probe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return probe.float()


def _probe_input(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    x = torch.randn((4, *shape), generator=torch.Generator().manual_seed(1)) * 3
    x[0] *= 1e-3  # mean square ~1e-5: a wrong eps shows
    return x.to(dtype)


def _reproduction(module: nn.Module, cls: type, variants: list[dict[str, Any]]) -> tuple[Optional[dict], str]:
    """The first of ``variants`` for which ``cls.from_module`` computes bit-for-bit what ``module`` computes, in
    every dtype of ``_PROBE_DTYPES``; or ``(None, why not)``."""
    probe, why = _probe_copy(module), "no variant matched"
    for kwargs in variants:
        for dtype in _PROBE_DTYPES:
            source = copy.deepcopy(probe).to(dtype)
            try:
                new = cls.from_module(source, **kwargs)
            except (TypeError, ValueError) as error:
                why = str(error)
                break
            x = _probe_input(tuple(new.normalized_shape) if hasattr(new, "normalized_shape") else (16,), dtype)
            with torch.no_grad(), normlayers_backend("reference"):
                try:
                    expected = source(x)
                except Exception as error:  # noqa: BLE001 — its forward does not take one row-major input
                    return None, f"its forward fails on a probe of shape {list(x.shape)} ({type(error).__name__})"
                if _mismatch(new(x), expected, "exact") is not None:
                    why = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) differs in {dtype}"
                    break
        else:
            return kwargs, ""
    return None, why


# ----------------------------------------------------------------------------------------------------------------------
# Building the new module and the record that restores the old one
# ----------------------------------------------------------------------------------------------------------------------


def _fidelity(new: nn.Module) -> str:
    """How ``new``, built by ``from_module``, compares with its source: ``"exact"`` (bit-for-bit, the default for
    classes that do not say), ``"rounding"`` (the same math, another reduction order) or ``"changes"`` (another
    function by design: not verified, not restored to the source class). A class says it as a class attribute; a
    ``from_module`` may set it on the instance when the source decides (a WS conv from timm's ``StdConv2d``)."""
    return getattr(new, "conversion_fidelity", "exact")


def _build(target: Target, old: nn.Module) -> nn.Module:
    cls = _target_class(target)
    if cls is None:
        new = target(old)
        if not isinstance(new, nn.Module):
            raise TypeError(f"the mapping's callable returned {type(new).__name__} for {type(old).__name__}, "
                            f"not an nn.Module")
        return new
    if isinstance(target, functools.partial) and target.args:
        raise TypeError(f"a functools.partial target may bind keyword arguments only, got {target!r}")
    from_module = getattr(cls, "from_module", None)
    if not callable(from_module):
        raise TypeError(f"no conversion from {type(old).__name__} to {cls.__name__} (it has no `from_module`); map "
                        f"{type(old).__name__} to a callable that builds the new module")
    kwargs = dict(target.keywords) if isinstance(target, functools.partial) else {}
    return from_module(old, **kwargs)


# What nn.Module.__init__ sets: the restored module gets its own; every other attribute of the source (timm's
# `_fast_norm` included: its forward reads it) is carried over.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _restore_record(old: nn.Module) -> _RestoreRecord:
    attributes = {k: v for k, v in vars(old).items() if k not in _MODULE_INTERNALS}
    return _RestoreRecord(type(old), attributes, dict(old.named_children()))


# ----------------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------------


_PROBE_SIZE = 12  # the height and width of a feature-map probe: more than a 3x3 or 7x7 conv's reach


def _probe_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    """Small inputs to try on ``module``, in order: rows of its width (``normalized_shape`` or the ``weight``'s
    shape), then NCHW feature maps of its channel count (``in_channels``, or that width when it is one number)."""
    weight = getattr(module, "weight", None)
    width = getattr(module, "normalized_shape", None)
    if width is None and isinstance(weight, Tensor):
        width = tuple(weight.shape)
    shapes = [] if width is None else [(2, 3, *tuple(width))]
    channels = getattr(module, "in_channels", getattr(module, "num_channels", None))
    if channels is None and width is not None and len(tuple(width)) == 1:
        channels = tuple(width)[0]
    if isinstance(channels, int):
        shapes.append((2, channels, _PROBE_SIZE, _PROBE_SIZE))
    return shapes


def _mismatch(actual: Any, expected: Any, fidelity: str) -> Optional[str]:
    """Why ``actual`` is not ``expected`` (``None`` if it is): bit-for-bit for ``"exact"``, within
    ``torch.testing.assert_close``'s rounding tolerances for the dtype for ``"rounding"``. NaN equals NaN: a NaN
    parameter gives NaN on both sides, and the swap is still right."""
    tolerance = {"rtol": 0.0, "atol": 0.0} if fidelity == "exact" else {}
    try:
        torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance)
    except AssertionError as error:
        return str(error)
    return None


def _verify(fqn: str, old: nn.Module, new: nn.Module) -> None:
    """One small forward through CPU copies of ``old`` and ``new`` on the reference backend; raise if the outputs
    differ: bit-for-bit for an ``"exact"`` swap, within rounding for a ``"rounding"`` one. On the reference, because
    the Triton kernels reduce in another order than the source's eager ops (they agree with the reference to
    rounding, tested on their own): what is checked here is the math (eps, offset, casting order). The probe is the
    first of :func:`_probe_shapes` both modules take (rows for a row norm, NCHW for a channels-first one)."""
    shapes = _probe_shapes(old)
    factory = factory_kwargs_of(old)
    if not shapes:
        warnings.warn(f"replace_norms: {fqn} ({type(old).__name__}) not verified: no probe input is known for it",
                      stacklevel=3)
        return
    if factory.get("device", torch.device("cpu")).type == "meta":
        warnings.warn(f"replace_norms: {fqn} not verified: the model is on the meta device", stacklevel=3)
        return
    dtype = factory.get("dtype", torch.float32)
    mismatch, shape = None, None
    with torch.no_grad(), normlayers_backend("reference"):
        for candidate in shapes:
            # fresh copies for each probe: a batch-statistics module updates its buffers when it runs
            old_copy, new_copy = (module.cpu() for module in copy.deepcopy((old, new)))
            x = torch.randn(candidate, generator=torch.Generator().manual_seed(0), dtype=dtype)
            try:
                expected = old_copy(x)
            except Exception:  # noqa: BLE001 — this probe shape does not fit the old module
                continue
            try:
                actual = new_copy(x)
            except (RuntimeError, TypeError, ValueError) as error:
                if mismatch is None:  # the first error is reported if no later shape fits both
                    mismatch, shape = f"{type(error).__name__}: {error}", candidate
                continue
            mismatch, shape = _mismatch(actual, expected, _fidelity(new)), candidate
            break
        else:
            if mismatch is None:
                warnings.warn(f"replace_norms: {fqn} ({type(old).__name__}) not verified: no probe of shape "
                              f"{' or '.join(str(list(c)) for c in shapes)} runs through it", stacklevel=3)
                return
    if mismatch is not None:
        how = "bit-for-bit" if _fidelity(new) == "exact" else "to rounding"
        raise ValueError(f"replace_norms: replacing {fqn} ({type(old).__name__}) by {type(new).__name__} changes its "
                         f"outputs (probe of shape {list(shape)}, {dtype}, compared {how}): {mismatch}. Fix the "
                         f"mapping, or pass verify=False if the change is intended")


# ----------------------------------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------------------------------


def _refuse_wrappers(model: nn.Module) -> None:
    wrappers: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        wrappers += [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # torch built without distributed
        pass
    for name, module in model.named_modules():
        if isinstance(module, tuple(wrappers)):
            where = f"the module at {name!r}" if name else "the model"
            raise ValueError(f"{where} is wrapped by {type(module).__name__}; call replace_norms before wrapping "
                             f"(replace → DDP/FSDP → compile), e.g. on `model.module` before DistributedDataParallel "
                             f"or before fully_shard")


def _patterns(value: Union[str, Sequence[str], None], name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a string or a sequence of strings (fnmatch patterns on module names), "
                    f"got {value!r}")


def _selected(fqn: str, module: nn.Module, filter_fn, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(fqn, p) for p in include):
        return False
    if any(fnmatch.fnmatchcase(fqn, p) for p in exclude):
        return False
    return filter_fn is None or bool(filter_fn(module, fqn))


@dataclass
class _Site:
    fqn: str
    module: nn.Module
    aliases: list[str]


def _sites(model: nn.Module) -> list[_Site]:
    """Every module once, in registration order, with all the names it is reachable under."""
    by_id: dict[int, _Site] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        site = by_id.get(id(module))
        if site is None:
            by_id[id(module)] = _Site(fqn, module, [])
        else:
            site.aliases.append(fqn)
    return list(by_id.values())


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return model


def _plan(model: nn.Module, mapping: Optional[MappingLike], filter_fn, include, exclude,
          strict: bool) -> list[tuple[Replacement, nn.Module, Optional[Target]]]:
    unavailable: dict[type, str] = {}
    if mapping is None:
        mapping, unavailable = _default_mapping()
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a dict from source type (or class-name pattern) to target, got "
                        f"{type(mapping).__name__}")
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    _refuse_wrappers(model)
    plan = []
    probed: _ProbeCache = {}
    for site in _sites(model):
        names = [site.fqn, *site.aliases]
        display = site.fqn or "<root>"
        if not any(_selected(n, site.module, filter_fn, include_p, exclude_p) for n in names):
            continue

        def skip(reason: str) -> None:
            plan.append((Replacement(site.fqn, type(site.module), None, reason, tuple(site.aliases), True),
                         site.module, None))

        if type(site.module) in unavailable:
            skip(unavailable[type(site.module)])
            continue
        try:
            target, reason, pattern = _match(site.module, mapping)
            if target is not None:
                matched, target = target, _resolve(site.module, target, pattern, probed)
                if isinstance(target, functools.partial) and target is not matched:
                    reason += "; probed: " + ", ".join(f"{k}={v!r}" for k, v in target.keywords.items())
        except _Refused as refusal:
            if strict:
                raise ValueError(f"replace_norms: {display}: {refusal}") from None
            warnings.warn(f"replace_norms: {display} left alone: {refusal}", stacklevel=3)
            skip(str(refusal))
            continue
        except _NotTaken as not_taken:
            skip(str(not_taken))
            continue
        if target is None:
            if not _is_ours(site.module) and _is_norm_like(site.module):
                skip(f"a norm-like module: {reason}")
            continue
        new_type = _target_class(target)
        plan.append((Replacement(site.fqn, type(site.module), new_type, reason, tuple(site.aliases)),
                     site.module, target))
    return plan


def plan_replacements(model: nn.Module, mapping: Optional[MappingLike] = None, *,
                      filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                      include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = None,
                      strict: bool = True) -> list[Replacement]:
    """What :func:`replace_norms` would change, without changing anything: one :class:`Replacement` per module that
    would be swapped (``new_type`` is ``None`` for a callable target), and one with ``skipped=True`` and the reason
    for each module left alone that looks like a norm: torch's norm classes, and any class whose name contains
    ``"norm"`` in any case and that holds parameters or buffers of its own (a ``BatchNorm2d`` under the default
    mapping, timm's ``RmsNorm2d`` where normlayers has no ``RMSNorm2d``, a ``*LayerNorm`` class that is a real layer
    norm), and with ``strict=False`` each refused module. Modules that ``filter_fn``, ``include`` or ``exclude``
    leave out are not listed. Same arguments and the same refusals as :func:`replace_norms`."""
    return [line for line, _, _ in _plan(_unwrap_compiled(model), mapping, filter_fn, include, exclude, strict)]


def replace_norms(model: nn.Module, mapping: Optional[MappingLike] = None, *,
                  filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                  include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = None,
                  strict: bool = True, verify: bool = True) -> nn.Module:
    """Swap the norms of ``model`` for normlayers modules, in place; returns ``model``.

    Args:
        model (nn.Module): the model. Modified in place; if ``model`` itself is swapped, the new module is returned.
            A ``torch.compile``'d model (``OptimizedModule``) is handled through its original module (it recompiles
            on the next call). Models wrapped by DataParallel, DistributedDataParallel or FSDP are refused: replace
            first, then wrap, then compile.
        mapping (dict, optional): source → target. A source is a class (matched exactly, or a subclass that does not
            override ``forward``) or an fnmatch pattern on the class name, in any case (``"*RMSNorm"`` also matches
            ``FooRmsNorm``). A target is a class with the conversion protocol (``from_module(module, **kwargs)``;
            every normlayers class that converts has it, see docs/convert.md), a ``functools.partial`` of one binding
            keyword arguments, or a callable ``module -> new module``. Default: :data:`DEFAULT_MAPPING`, which swaps
            only norms of identical math: ``nn.LayerNorm → LayerNorm``, ``nn.RMSNorm → RMSNorm``,
            ``nn.GroupNorm → GroupNorm``, and the Hugging
            Face ``*RMSNorm`` classes and RMS norms named ``*LayerNorm`` (T5's) → ``RMSNorm`` with their eps, and
            the ``1 + w`` offset and casting order found by probing the class; when timm is imported, also
            :func:`timm_mapping`'s entries (timm's ``LayerNorm``, ``RmsNorm``, ``LayerNorm2d``, ``RmsNorm2d``,
            ``GroupNorm*``, ``EvoNorm2d*``, ``StdConv2d``, ``ScaledStdConv2d`` → the normlayers class of the same
            function). Swaps that change the function (``nn.BatchNorm2d → BatchChannelNorm2d``,
            ``nn.Conv2d → WSConv2d``) happen only when the mapping asks; a given mapping replaces the default one.
        filter_fn (callable, optional): ``(module, fqn) -> bool``; only modules for which it is true are swapped.
        include, exclude (str or list of str, optional): fnmatch patterns on module names; a module is swapped when
            one of its names matches ``include`` (if given) and none matches ``exclude``.
        strict (bool): raise on a module that matches but cannot be swapped faithfully (a subclass overriding
            ``forward``, a gated RMSNorm, a ``*RMSNorm`` class whose outputs no ``RMSNorm`` variant reproduces
            bit-for-bit); with ``False`` it is left alone with a warning. Default: ``True``.
        verify (bool): before swapping, run one small forward in the model's dtype through CPU copies of the old
            and the new module, on the reference backend, for each source type, and raise ``ValueError`` if the
            outputs differ: bit-for-bit (NaN equal to NaN) unless the new class declares
            ``conversion_fidelity = "rounding"`` (``LayerNorm``: torch's kernels reduce in another order), then
            within rounding. Classes declaring ``"changes"`` (BCN, WS convs: another function by design) and
            meta-device models are not verified. Default: ``True``.

    Parameters and buffers are adopted, not copied: the new module holds the same objects, so device, dtype,
    ``requires_grad``, weight tying and optimizer state survive, and ``state_dict`` keys are unchanged for same-math
    swaps. ``training`` is copied; forward hooks are not (a warning names the module). A module reachable under two
    names becomes one new module. Idempotent: normlayers modules are never sources unless mapped by exact type.

    Examples::

        >>> model = normlayers.replace_norms(model)                             # same math, faster norms
        >>> normlayers.replace_norms(cnn, {nn.BatchNorm2d: functools.partial(normlayers.BatchChannelNorm2d,
        ...                                                                 num_groups=8)})
    """
    compiled = _unwrap_compiled(model)
    if compiled is not model:
        warnings.warn("replace_norms: replacing inside a torch.compile'd model; it recompiles on its next call. "
                      "Replace before compiling to avoid that", stacklevel=2)
    root = compiled
    plan = _plan(root, mapping, filter_fn, include, exclude, strict)
    built: list[tuple[Replacement, nn.Module, nn.Module]] = []
    verified: set[type] = set()
    for line, old, target in plan:
        if target is None:
            continue
        new = _build(target, old)
        new.train(old.training)
        same_math = _fidelity(new) != "changes"
        if same_math and _target_class(target) is not None:
            object.__setattr__(new, "_normlayers_restore", _restore_record(old))
        if verify and same_math and type(old) not in verified:
            _verify(line.fqn or "<root>", old, new)
            verified.add(type(old))
        if old._forward_hooks or old._forward_pre_hooks or old._backward_hooks:
            warnings.warn(f"replace_norms: {line.fqn or '<root>'} has hooks; they are not carried over to the new "
                          f"module", stacklevel=2)
        built.append((line, old, new))
    for line, _, new in built:
        for fqn in (line.fqn, *line.aliases):
            if not fqn:
                root = new
                continue
            root.set_submodule(fqn, new)
    if built:
        counts: dict[str, int] = {}
        for line, old, new in built:
            key = f"{type(old).__name__} -> {type(new).__name__}"
            counts[key] = counts.get(key, 0) + 1
        logger.info("replace_norms: %s", ", ".join(f"{n} x {k}" for k, n in counts.items()))
    if root is not compiled:  # the root itself was swapped
        return root
    return model


# ----------------------------------------------------------------------------------------------------------------------
# restore_norms
# ----------------------------------------------------------------------------------------------------------------------


def _restore_one(module: nn.Module) -> Optional[nn.Module]:
    """The plain module computing what ``module`` computes: the class a same-math swap replaced, rebuilt around the
    same parameters, or ``module.to_torch()``; ``None`` if there is neither."""
    record: Optional[_RestoreRecord] = getattr(module, "_normlayers_restore", None)
    if record is not None:
        old = record.cls.__new__(record.cls)
        nn.Module.__init__(old)
        vars(old).update(copy.copy(record.attributes))
        # None entries too (a conv without bias), unless the class keeps them as plain attributes (timm's EvoNorm `v`)
        adopt(old, module, {name: name for name in module._parameters if name not in record.attributes})
        for name, buffer in module.named_buffers(recurse=False):
            old.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
        for name, child in {**record.children, **dict(module.named_children())}.items():  # (an EvoNorm's `act`)
            old.add_module(name, child)
        return old.train(module.training)
    to_torch = getattr(module, "to_torch", None)
    if not callable(to_torch):
        return None
    try:
        return to_torch()
    except ImportError:  # its plain equivalent lives in a package that is not installed (an EvoNorm's: timm)
        return None


def restore_norms(model: nn.Module) -> nn.Module:
    """Turn normlayers modules back into plain modules computing the same function, in place; returns ``model``
    (or the new root if the root itself is restored). For exporting checkpoints that load without normlayers.

    * a module swapped by :func:`replace_norms` with the same math becomes an instance of the class it replaced
      (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, timm's ``GroupNormAct``, ``LlamaRMSNorm``,
      ``GemmaRMSNorm``, …), holding the same parameters;
    * any other module with a ``to_torch()`` method becomes what it returns: ``LayerNorm``/``RMSNorm`` become
      ``nn.LayerNorm``/``nn.RMSNorm`` (an ``RMSNorm`` with ``weight_offset`` gets a new
      ``weight = weight + weight_offset``; ``cast_mode="llama"`` becomes torch's rounding), ``WSConv2d``/
      ``ScaledWSConv2d`` become ``nn.Conv2d`` with the standardized weight baked in (:meth:`WSConv2d.to_conv2d`);
    * EvoNorms become timm's class of the same name when timm is installed;
    * normlayers modules with no plain torch equivalent (``CRMSNorm``, ``BatchChannelNorm2d``, EvoNorm without timm)
      stay, with a warning.
    """
    root = _unwrap_compiled(model)
    restored: dict[int, Optional[nn.Module]] = {}
    kept: list[str] = []
    new_root = root
    for fqn, module in list(root.named_modules(remove_duplicate=False)):
        convertible = hasattr(module, "_normlayers_restore") or callable(getattr(module, "to_torch", None))
        if not (convertible or _is_ours(module)) or type(module).__name__.startswith("_"):  # (private parts of ours)
            continue
        if id(module) not in restored:
            restored[id(module)] = _restore_one(module)
            if restored[id(module)] is None:
                kept.append(f"{fqn or '<root>'} ({type(module).__name__})")
        replacement = restored[id(module)]
        if replacement is None:
            continue
        if not fqn:
            new_root = replacement
            continue
        root.set_submodule(fqn, replacement)
    if kept:
        warnings.warn(f"restore_norms: no plain torch module computes the same function as {', '.join(kept)}; "
                      f"left in place", stacklevel=2)
    return new_root if new_root is not root else model
