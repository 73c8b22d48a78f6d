"""``replace_norms``, ``plan_replacements`` and ``restore_norms``: swap a model's norms for normlayers' in place.

Conventions (research ecosystem_and_api.md §1, §7.3): the new module is built on the ``meta`` device and *adopts* the
old module's Parameter and buffer objects (torchao ``from_float``), so device, dtype, ``requires_grad``, weight tying
and optimizer references survive and ``state_dict`` keys stay the same; ``training`` is copied; a module reachable
under several names becomes one new module; only exact source types (or subclasses that keep the parent's
``forward``) are swapped (the ``convert_sync_batchnorm`` subclass bug, pytorch#187298, timm#1254); wrapped models are
refused (replace → DDP/FSDP → compile).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import inspect
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from normlayers.nn.batch_channel import BatchChannelNorm2d
from normlayers.nn.row_norms import LayerNorm, RMSNorm
from normlayers.nn.weight_std import ScaledWSConv2d, WSConv2d, _StandardizedConv2d

__all__ = ["DEFAULT_MAPPING", "Replacement", "plan_replacements", "replace_norms", "restore_norms"]

logger = logging.getLogger("normlayers")

Target = Union[type, "functools.partial[nn.Module]", Callable[[nn.Module], nn.Module]]
MappingLike = Mapping[Union[type, str], Target]

# Same math only: these swaps change the speed, never the outputs. A string key is an fnmatch pattern on the class
# name; "*RMSNorm" duck-types Hugging Face's ~200 RMSNorm classes (none subclasses nn.RMSNorm; research §1.5).
DEFAULT_MAPPING: dict[Union[type, str], Target] = {
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    "*RMSNorm": RMSNorm,
}

# Targets whose outputs equal the source's by construction; swaps to other classes change the function by design
# (BatchNorm2d → BatchChannelNorm2d, Conv2d → WSConv2d, …) and are not verified.
_SAME_MATH_TARGETS = (LayerNorm, RMSNorm)

# `1 + w` in the source of an RMSNorm's forward: the Gemma family's offset (research §1.5: 16 classes in transformers
# 5.23, all written `1.0 + self.weight.float()` or `1 + self.weight`).
_OFFSET_SOURCE = re.compile(r"1(\.0)?\s*\+\s*self\.weight|self\.weight(\.float\(\))?\s*\+\s*1(\.0)?\b")


@dataclass(frozen=True)
class Replacement:
    """One line of :func:`plan_replacements`: the module at ``fqn`` (also reachable as ``aliases``) of type
    ``old_type`` becomes a ``new_type`` (``None`` when the target is a callable, whose result type is known only
    when it runs), or, with ``skipped``, is left alone; and why."""

    fqn: str
    old_type: type
    new_type: Optional[type]
    reason: str
    aliases: tuple[str, ...] = ()
    skipped: bool = False


@dataclass(frozen=True)
class _RestoreRecord:
    """How to rebuild the module a same-math swap replaced: its class and its plain attributes."""

    cls: type
    attributes: dict[str, Any]


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


def _hf_rmsnorm_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a class named *RMSNorm) is not a plain RMSNorm we can take over, or None."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if names != ["weight"] or list(module.children()) or list(module.buffers(recurse=False)):
        return f"it holds {names or 'no'} parameters, buffers or submodules, not exactly one `weight`"
    if not any(isinstance(getattr(module, name, None), float) for name in ("variance_epsilon", "eps")):
        return "it has no float `variance_epsilon` or `eps` attribute"
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if len(params) != 1:
        return f"its forward takes {[p.name for p in params]} (a gated or extra-argument norm), not one input"
    return None


def _match(module: nn.Module, mapping: MappingLike) -> tuple[Optional[Target], str]:
    """The target for ``module`` and the reason, or ``(None, reason)``; raises ``_Refused`` for refusals."""
    cls = type(module)
    if cls in mapping:
        return mapping[cls], f"mapped type {cls.__name__}"
    if _is_ours(module):
        return None, "already a normlayers module"
    for key, target in mapping.items():
        if isinstance(key, type) and isinstance(module, key):
            if _overrides_forward(cls, key):
                raise _Refused(f"{cls.__name__} subclasses {key.__name__} but overrides forward; swapping it would "
                               f"drop that behaviour. Map {cls.__name__} explicitly, exclude it, or pass strict=False "
                               f"to leave it alone")
            return target, f"subclass of {key.__name__} with its forward"
    for key, target in mapping.items():
        if isinstance(key, str) and fnmatch.fnmatchcase(cls.__name__, key):
            problem = _hf_rmsnorm_problem(module) if key.endswith("RMSNorm") else None
            if problem is not None:
                raise _Refused(f"{cls.__name__} looks like an RMSNorm but {problem}. Map it explicitly, exclude it, or "
                               f"pass strict=False to leave it alone")
            return target, f"class name matches {key!r}"
    return None, "not in the mapping"


class _Refused(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# Building the new module (adopting parameters and buffers)
# ----------------------------------------------------------------------------------------------------------------------


def _adopt(new: nn.Module, old: nn.Module, names: Mapping[str, str]) -> None:
    """Make ``new.<new_name>`` the very Parameter/buffer object ``old.<old_name>`` for each pair (dotted names)."""
    for new_name, old_name in names.items():
        old_owner, _, old_leaf = old_name.rpartition(".")
        new_owner, _, new_leaf = new_name.rpartition(".")
        src = old.get_submodule(old_owner) if old_owner else old
        dst = new.get_submodule(new_owner) if new_owner else new
        if old_leaf in src._parameters:
            dst._parameters[new_leaf] = src._parameters[old_leaf]
        else:
            dst._buffers[new_leaf] = src._buffers[old_leaf]


def _like(old: nn.Module) -> dict[str, Any]:
    tensor = next(iter(old.parameters()), None)
    if tensor is None:
        tensor = next(iter(old.buffers()), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _materialize(new: nn.Module, old: nn.Module, init: Mapping[str, float]) -> None:
    """Give the parameters/buffers that ``new`` has and ``old`` lacked (still on meta) the old module's device and
    dtype, filled with ``init[name]``."""
    factory = _like(old)
    for name, value in init.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_name) if owner_name else new
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        placeholder = table[leaf]
        filled = torch.full(placeholder.shape, value, **{"dtype": placeholder.dtype, **factory})
        table[leaf] = nn.Parameter(filled, placeholder.requires_grad) if leaf in owner._parameters else filled


def _eps_of(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    raise TypeError(f"{type(module).__name__} has no float `variance_epsilon` or `eps`")


def _hf_offset(module: nn.Module) -> float:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = ""
    return 1.0 if _OFFSET_SOURCE.search(source) else 0.0


def _to_layer_norm(old: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if not isinstance(old, nn.LayerNorm):
        raise TypeError(f"no conversion from {type(old).__name__} to normlayers.LayerNorm; pass a callable")
    with torch.device("meta"):
        new = LayerNorm(old.normalized_shape, old.eps, old.elementwise_affine, old.bias is not None, **kwargs)
    _adopt(new, old, {name: name for name, _ in old.named_parameters(recurse=False)})
    return new


def _to_rms_norm(old: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(old, nn.RMSNorm):
        args = {"eps": old.eps, "elementwise_affine": old.elementwise_affine, **kwargs}
        shape = old.normalized_shape
    elif type(old).__name__.endswith("RMSNorm") and _hf_rmsnorm_problem(old) is None:
        offset = _hf_offset(old)
        # Gemma-style norms scale in fp32 and round once; Llama-style ones round, then scale (research §1.5).
        args = {"eps": _eps_of(old), "weight_offset": offset, "cast_mode": "torch" if offset else "llama", **kwargs}
        shape = tuple(old.weight.shape)
    else:
        raise TypeError(f"no conversion from {type(old).__name__} to normlayers.RMSNorm; pass a callable")
    with torch.device("meta"):
        new = RMSNorm(shape, **args)
    _adopt(new, old, {name: name for name, _ in old.named_parameters(recurse=False)})
    return new


def _to_batch_channel(old: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if type(old) is not nn.BatchNorm2d or not (old.affine and old.track_running_stats):
        raise TypeError(f"BatchChannelNorm2d adopts an nn.BatchNorm2d with affine=True and "
                        f"track_running_stats=True as its batch stage; got {old!r}")
    args = {"momentum": old.momentum, "bn_eps": old.eps, **kwargs}
    with torch.device("meta"):
        new = BatchChannelNorm2d(old.num_features, **args)
    _adopt(new, old, {f"bn.{name}": name for name in
                      ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    init = {"weight": 1.0, "bias": 0.0}
    if new.estimate:
        init["bn.estbn_moving_speed"] = new.estimate_rate
    _materialize(new, old, init)
    return new


def _to_ws_conv(cls: type, old: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if type(old) is not nn.Conv2d:
        raise TypeError(f"no conversion from {type(old).__name__} to {cls.__name__}; it adopts an nn.Conv2d")
    with torch.device("meta"):
        new = cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                  old.groups, old.bias is not None, old.padding_mode, **kwargs)
    _adopt(new, old, {name: name for name, _ in old.named_parameters(recurse=False)})
    if cls is ScaledWSConv2d:
        _materialize(new, old, {"gain": new.gain_init})
    return new


def _build(target: Target, old: nn.Module) -> nn.Module:
    cls = _target_class(target)
    if cls is None:
        new = target(old)
        if not isinstance(new, nn.Module):
            raise TypeError(f"the mapping's callable returned {type(new).__name__} for {type(old).__name__}, "
                            f"not an nn.Module")
        return new
    kwargs = dict(target.keywords) if isinstance(target, functools.partial) else {}
    if isinstance(target, functools.partial) and target.args:
        raise TypeError(f"a functools.partial target may bind keyword arguments only, got {target!r}")
    if cls is LayerNorm:
        return _to_layer_norm(old, kwargs)
    if cls is RMSNorm:
        return _to_rms_norm(old, kwargs)
    if cls is BatchChannelNorm2d:
        return _to_batch_channel(old, kwargs)
    if cls in (WSConv2d, ScaledWSConv2d):
        return _to_ws_conv(cls, old, kwargs)
    from_module = getattr(cls, "from_module", None)
    if callable(from_module):
        return from_module(old, **kwargs)
    raise TypeError(f"no conversion from {type(old).__name__} to {cls.__name__} (it has no `from_module`); map "
                    f"{type(old).__name__} to a callable that builds the new module")


def _restore_record(old: nn.Module) -> _RestoreRecord:
    attributes = {k: v for k, v in vars(old).items() if not k.startswith("_") and k != "training"}
    return _RestoreRecord(type(old), attributes)


# ----------------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------------


def _probe_shape(module: nn.Module) -> Optional[tuple[int, ...]]:
    shape = getattr(module, "normalized_shape", None)
    if shape is None and isinstance(getattr(module, "weight", None), Tensor):
        shape = tuple(module.weight.shape)
    return None if shape is None else (2, 3, *tuple(shape))


def _verify(fqn: str, old: nn.Module, new: nn.Module) -> None:
    """One small forward through copies of ``old`` and ``new``; raise if the outputs differ."""
    shape = _probe_shape(old)
    factory = _like(old)
    if shape is None:
        warnings.warn(f"replace_norms: {fqn} ({type(old).__name__}) not verified: no probe input is known for it",
                      stacklevel=3)
        return
    if factory.get("device", torch.device("cpu")).type == "meta":
        warnings.warn(f"replace_norms: {fqn} not verified: the model is on the meta device", stacklevel=3)
        return
    dtype = factory.get("dtype", torch.float32)
    generator = torch.Generator(device=factory.get("device", "cpu")).manual_seed(0)
    x = torch.randn(shape, generator=generator, **{**factory, "dtype": dtype})
    with torch.no_grad():
        try:
            expected = copy.deepcopy(old)(x)
        except Exception as error:  # noqa: BLE001 — the probe's guessed shape does not fit this module
            warnings.warn(f"replace_norms: {fqn} ({type(old).__name__}) not verified: a probe of shape {list(shape)} "
                          f"fails on it ({type(error).__name__})", stacklevel=3)
            return
        try:
            actual = copy.deepcopy(new)(x)
            torch.testing.assert_close(actual, expected)
        except (AssertionError, RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"replace_norms: replacing {fqn} ({type(old).__name__}) by {type(new).__name__} changes "
                             f"its outputs (probe of shape {list(shape)}, {dtype}): {error}. Fix the mapping, or pass "
                             f"verify=False if the change is intended") from None


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
    if mapping is None:
        mapping = DEFAULT_MAPPING
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a dict from source type (or class-name pattern) to target, got "
                        f"{type(mapping).__name__}")
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    _refuse_wrappers(model)
    plan = []
    for site in _sites(model):
        names = [site.fqn, *site.aliases]
        display = site.fqn or "<root>"
        if not any(_selected(n, site.module, filter_fn, include_p, exclude_p) for n in names):
            continue
        try:
            target, reason = _match(site.module, mapping)
        except _Refused as refusal:
            if strict:
                raise ValueError(f"replace_norms: {display}: {refusal}") from None
            warnings.warn(f"replace_norms: {display} left alone: {refusal}", stacklevel=3)
            plan.append((Replacement(site.fqn, type(site.module), None, str(refusal), tuple(site.aliases), True),
                         site.module, None))
            continue
        if target is None:
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
    would be swapped (``new_type`` is ``None`` for a callable target) or, with ``strict=False``, left alone
    (``skipped=True``; the reason says why). Same arguments and the same refusals as :func:`replace_norms`."""
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
            override ``forward``) or an fnmatch pattern on the class name (``"*RMSNorm"``). A target is a normlayers
            class, a ``functools.partial`` of one binding keyword arguments, a class with a ``from_module(module,
            **kwargs)`` classmethod, or a callable ``module -> new module``. Default: :data:`DEFAULT_MAPPING`, which
            swaps only norms of identical math: ``nn.LayerNorm → LayerNorm``, ``nn.RMSNorm → RMSNorm`` and Hugging
            Face ``*RMSNorm`` classes → ``RMSNorm`` with their eps, ``1 + w`` offset and casting order. Swaps that
            change the function (``nn.BatchNorm2d → BatchChannelNorm2d``, ``nn.Conv2d → WSConv2d``) happen only when
            the mapping asks; a given mapping replaces the default one.
        filter_fn (callable, optional): ``(module, fqn) -> bool``; only modules for which it is true are swapped.
        include, exclude (str or list of str, optional): fnmatch patterns on module names; a module is swapped when
            one of its names matches ``include`` (if given) and none matches ``exclude``.
        strict (bool): raise on a module that matches but cannot be swapped faithfully (a subclass overriding
            ``forward``, a gated RMSNorm); with ``False`` it is left alone with a warning. Default: ``True``.
        verify (bool): before swapping, run one small forward through a copy of the old and the new module for each
            source type and raise ``ValueError`` if the outputs differ. Swaps to classes that change the function by
            design (anything but LayerNorm/RMSNorm targets; callables are verified) and meta-device models are not
            verified. Default: ``True``.

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
        if type(new) in _SAME_MATH_TARGETS:
            object.__setattr__(new, "_normlayers_restore", _restore_record(old))
        needs_check = _target_class(target) is None or isinstance(new, _SAME_MATH_TARGETS)
        if verify and needs_check and type(old) not in verified:
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
    record: Optional[_RestoreRecord] = getattr(module, "_normlayers_restore", None)
    if record is not None:
        old = record.cls.__new__(record.cls)
        nn.Module.__init__(old)
        vars(old).update(copy.copy(record.attributes))
        _adopt(old, module, {name: name for name, _ in module.named_parameters(recurse=False)})
        for name, buffer in module.named_buffers(recurse=False):
            old.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
        return old.train(module.training)
    if type(module) is LayerNorm:
        with torch.device("meta"):
            plain = nn.LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                                 module.bias is not None)
        _adopt(plain, module, {name: name for name, _ in module.named_parameters(recurse=False)})
        return plain.train(module.training)
    if type(module) is RMSNorm:
        with torch.device("meta"):
            plain = nn.RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine)
        if module.weight_offset and module.weight is not None:
            # nn.RMSNorm has no offset: its weight becomes the scale (a new parameter of the same name)
            plain.weight = nn.Parameter((module.weight + module.weight_offset).detach(), module.weight.requires_grad)
        else:
            _adopt(plain, module, {name: name for name, _ in module.named_parameters(recurse=False)})
        return plain.train(module.training)
    if isinstance(module, _StandardizedConv2d):
        return module.to_conv2d()
    return None


def restore_norms(model: nn.Module) -> nn.Module:
    """Turn normlayers modules back into plain modules computing the same function, in place; returns ``model``
    (or the new root if the root itself is restored). For exporting checkpoints that load without normlayers.

    * a module swapped by :func:`replace_norms` with the same math becomes an instance of the class it replaced
      (``nn.LayerNorm``, ``nn.RMSNorm``, ``LlamaRMSNorm``, ``GemmaRMSNorm``, …), holding the same parameters;
    * other ``LayerNorm``/``RMSNorm`` become ``nn.LayerNorm``/``nn.RMSNorm`` (an ``RMSNorm`` with ``weight_offset``
      gets a new ``weight = weight + weight_offset``; ``cast_mode="llama"`` becomes torch's rounding);
    * ``WSConv2d``/``ScaledWSConv2d`` become ``nn.Conv2d`` with the standardized weight baked in
      (:meth:`WSConv2d.to_conv2d`);
    * modules with no plain torch equivalent (``CRMSNorm``, ``BatchChannelNorm2d``, EvoNorm) stay, with a warning.
    """
    root = _unwrap_compiled(model)
    restored: dict[int, Optional[nn.Module]] = {}
    kept: list[str] = []
    new_root = root
    for fqn, module in list(root.named_modules(remove_duplicate=False)):
        if not _is_ours(module) or type(module).__name__.startswith("_"):  # private parts of our modules
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
