"""``fold_norms``: fold eval-mode, affine-equivalent norms into the adjacent linear map, for inference.

In eval mode several norms are a fixed per-channel affine ``y = a ⊙ x + c``: BatchNorm with running statistics, the
batch stage of :class:`~normlayers.BatchChannelNorm2d`, UnifiedNorm/PowerNorm with running statistics (any module
exposing ``as_affine() -> (scale, shift)``). Such an affine disappears into the conv/linear that produces its input
(``W' = diag(a)·W``, ``b' = a ⊙ b + c``) or the linear that reads its output (``W' = W·diag(a)``, ``b' = b + W·c``).
The data flow is read from a ``torch.fx`` trace (a producer whose only user is the norm; a norm whose only users are
linear maps); for models that do not trace, consecutive children of ``nn.Sequential`` containers are used.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from normlayers.nn.batch_channel import BatchChannelNorm2d
from normlayers.nn.channel_norms import LayerNorm2d
from normlayers.nn.weight_std import _StandardizedConv2d

__all__ = ["fold_norms", "is_foldable"]

logger = logging.getLogger("normlayers")

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Flow:
    """What reads what: for each module called exactly once, the module producing its input (if that producer's
    output has no other user) and the modules reading its output (if all of its users are modules)."""

    producer: dict[str, str]
    consumers: dict[str, list[str]]


class _Tracer(torch.fx.Tracer):
    """Keeps every module fold_norms may fold (or fold into) as one call, even when it is not a torch.nn class."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (_channel_affine_candidate(m) or isinstance(m, (nn.LayerNorm, *_PRODUCERS))
                or super().is_leaf_module(m, module_qualified_name))


def _channel_affine_candidate(m: nn.Module) -> bool:
    return isinstance(m, (BatchChannelNorm2d, nn.modules.batchnorm._BatchNorm)) or callable(getattr(m, "as_affine",
                                                                                                     None))


def _fx_flow(model: nn.Module) -> Optional[_Flow]:
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 — any tracing failure means: use the nn.Sequential fallback
        logger.info("fold_norms: %s does not trace with torch.fx (%s); folding inside nn.Sequential only",
                    type(model).__name__, type(error).__name__)
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    once = {name for name, n in calls.items() if n == 1}
    flow = _Flow({}, {})
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in once:
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and source.target in once
                and len(source.users) == 1 and len(node.args) == 1 and not node.kwargs):
            flow.producer[node.target] = source.target
        users = list(node.users)
        if users and all(u.op == "call_module" and u.target in once and u.args[:1] == (node,) and len(u.args) == 1
                         for u in users):
            flow.consumers[node.target] = [u.target for u in users]
    return flow


def _sequential_flow(model: nn.Module) -> _Flow:
    flow = _Flow({}, {})
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if counts[id(a)] == 1 and counts[id(b)] == 1:
                prefix = f"{name}." if name else ""
                flow.producer[prefix + b_name] = prefix + a_name
                flow.consumers[prefix + a_name] = [prefix + b_name]
    return flow


def _channel_affine(module: nn.Module) -> Optional[tuple[Tensor, Tensor]]:
    """``(a, c)`` in fp64 if ``module`` is, in eval mode, the per-channel affine ``a ⊙ x + c``; else None."""
    if module.training:
        return None
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and module.track_running_stats:
        a = torch.rsqrt(module.running_var.double() + module.eps)
        c = -module.running_mean.double() * a
        if module.affine:
            a, c = a * module.weight.double(), c * module.weight.double() + module.bias.double()
        return a, c
    as_affine = getattr(module, "as_affine", None)
    if callable(as_affine):
        scale, shift = as_affine()
        return scale.detach().double(), shift.detach().double()
    return None


def _fold_into_producer(producer: nn.Module, a: Tensor, c: Tensor) -> None:
    w = producer.weight.detach().double()
    b = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(a)
    w = w * a.view(-1, *([1] * (w.dim() - 1)))
    _write(producer, w, a * b + c)


def _fold_into_consumer(consumer: nn.Linear, a: Tensor, c: Tensor) -> None:
    w = consumer.weight.detach().double()
    b = consumer.bias.detach().double() if consumer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                       device=w.device)
    _write(consumer, w * a, b + w @ c)


def _write(module: nn.Module, weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight)
        if module.bias is not None:
            module.bias.copy_(bias)
        else:
            module.bias = nn.Parameter(bias.to(module.weight.dtype), module.weight.requires_grad)


def _channel_layers(norm: nn.Module) -> tuple[type, ...]:
    """The linear maps whose output-feature axis is the axis ``norm`` scales. The trace has no shapes, so this is
    decided by type: BatchNorm2d/3d scale dim 1 of conv outputs; BatchNorm1d dim 1 of ``(N, C)`` or ``(N, C, L)``
    (a Linear's or Conv1d's output); ``as_affine`` modules the last dim (channels-last, as UnifiedNorm over
    ``(B, T, C)``), or dim 1 of conv outputs when they set ``channel_dim = 1``."""
    if isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm3d)):
        return (nn.Conv2d, nn.Conv3d)
    if isinstance(norm, nn.BatchNorm1d):
        return (nn.Linear, nn.Conv1d)
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d) if getattr(norm, "channel_dim", -1) == 1 else (nn.Linear,)


def _channels_match(layer: nn.Module, norm: nn.Module, a: Tensor) -> bool:
    return isinstance(layer, _channel_layers(norm)) and layer.weight.shape[0] == a.numel()


def _bcn_parts(bcn: BatchChannelNorm2d) -> tuple[Tensor, Tensor, nn.GroupNorm]:
    """An eval-mode BCN = its batch stage (a per-channel affine) followed by a GroupNorm with the group affine
    repeated over each group's channels (docs/batch_channel.md)."""
    bn = bcn.bn
    a = bn.weight.detach().double() * torch.rsqrt(bn.running_var.double() + bcn.bn_eps)
    c = bn.bias.detach().double() - bn.running_mean.double() * a
    group = nn.GroupNorm(bcn.num_groups, bcn.num_channels, bcn.eps, device=bcn.weight.device, dtype=bcn.weight.dtype)
    per_group = bcn.num_channels // bcn.num_groups
    with torch.no_grad():
        group.weight.copy_(bcn.weight.detach().reshape(-1).repeat_interleave(per_group))
        group.bias.copy_(bcn.bias.detach().reshape(-1).repeat_interleave(per_group))
    return a, c, group.eval()


def _check_running_var(model: nn.Module) -> None:
    """Refuse, before anything changes, a running variance that cannot be folded: ``1/sqrt(running_var + eps)`` of
    a NaN or a negative value is NaN, which would surface only as NaN outputs."""
    for name, module in model.named_modules():
        if isinstance(module, BatchChannelNorm2d):
            name, module = f"{name}.bn" if name else "bn", module.bn
        elif not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        running_var = module.running_var
        if running_var is not None and not bool((running_var >= 0).all()):
            bad = running_var[~(running_var >= 0)]
            raise ValueError(f"fold_norms: {name or '<root>'}.running_var must be >= 0 and not NaN to be folded; "
                             f"{bad.numel()} of its {running_var.numel()} entries are not (e.g. {bad[0].item():.3g}). "
                             f"Load valid statistics or call reset_running_stats()")


def _outputs(model: nn.Module, example_inputs: Optional[tuple]) -> Optional[Any]:
    if example_inputs is None:
        return None
    with torch.no_grad():
        return model(*example_inputs)


def _is_row_layer_norm(module: nn.Module) -> bool:
    """An ``nn.LayerNorm`` over the last dim, the dim a consuming ``nn.Linear`` reads; not a channels-first
    :class:`~normlayers.LayerNorm2d`, whose affine acts on dim 1."""
    return isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm2d)


def is_foldable(module: nn.Module) -> bool:
    """Whether :func:`fold_norms` has a rule for ``module``'s kind (it still needs a foldable neighbour in the model):
    standardized convs, BatchNorm, BatchChannelNorm2d, affine LayerNorm, and modules with ``as_affine()``."""
    if isinstance(module, (_StandardizedConv2d, BatchChannelNorm2d, nn.modules.batchnorm._BatchNorm)):
        return True
    if _is_row_layer_norm(module):
        return module.elementwise_affine
    return callable(getattr(module, "as_affine", None))


def fold_norms(model: nn.Module, example_inputs: Optional[tuple] = None) -> nn.Module:
    """Fold eval-mode, affine-equivalent norms into the adjacent linear maps, for inference; in place, returns
    ``model`` (or, when ``model`` is itself a ``WSConv2d``/``ScaledWSConv2d``, the ``nn.Conv2d`` that replaces it).

    * ``WSConv2d``/``ScaledWSConv2d`` become ``nn.Conv2d`` with the standardized weight baked in.
    * ``nn.BatchNorm1d/2d/3d`` with running statistics, and any module with ``as_affine() -> (scale, shift)``
      (per-channel, e.g. UnifiedNorm with running statistics; channels last, or dim 1 of a conv output when the
      module sets ``channel_dim = 1``), become ``nn.Identity``: their affine goes into the linear map or conv
      producing their input when that producer has no other reader (BatchNorm2d/3d: a conv; BatchNorm1d: a Linear
      or Conv1d; channels-last modules: a Linear), else into the ``nn.Linear`` layers that are the only readers of
      their output (BatchNorm1d and channels-last modules).
    * ``BatchChannelNorm2d``: its batch stage goes into the producing conv and the rest becomes an ``nn.GroupNorm``.
    * ``nn.LayerNorm`` whose only readers are ``nn.Linear`` layers: its ``γ, β`` go into them (the norm stays,
      affine-free).

    Args:
        model (nn.Module): in eval mode (``ValueError`` otherwise: training-mode norms use batch statistics).
        example_inputs (tuple, optional): positional inputs; when given, the outputs before and after are compared
            and a ``RuntimeError`` is raised if they differ beyond fp rounding.

    Norms with no foldable neighbour are left as they are. The arithmetic is done in fp64, then rounded to each
    parameter's dtype.
    """
    if model.training:
        raise ValueError("fold_norms folds eval-mode norms (running statistics); call model.eval() first")
    _check_running_var(model)
    before = _outputs(model, example_inputs)
    if isinstance(model, _StandardizedConv2d):  # the model is one standardized conv: its baked twin replaces it
        conv = model.to_conv2d()
        if before is not None:
            _check_same(before, _outputs(conv, example_inputs))
        return conv
    baked = [(name, m) for name, m in model.named_modules() if isinstance(m, _StandardizedConv2d)]
    for name, module in baked:
        model.set_submodule(name, module.to_conv2d())
    flow = _fx_flow(model) or _sequential_flow(model)
    modules = dict(model.named_modules())
    folded: list[str] = []
    for name, module in list(modules.items()):
        producer = modules.get(flow.producer.get(name, ""))
        consumers = [modules[c] for c in flow.consumers.get(name, [])]
        if isinstance(module, BatchChannelNorm2d) and not module.training:
            if isinstance(producer, nn.Conv2d):
                a, c, group = _bcn_parts(module)
                _fold_into_producer(producer, a, c)
                model.set_submodule(name, group)
                folded.append(name)
            continue
        if _is_row_layer_norm(module) and module.elementwise_affine:
            if consumers and all(isinstance(m, nn.Linear) for m in consumers):
                gamma = module.weight.detach().double()
                beta = module.bias.detach().double() if module.bias is not None else torch.zeros_like(gamma)
                if gamma.dim() != 1:
                    continue
                for consumer in consumers:
                    _fold_into_consumer(consumer, gamma, beta)
                # the same module (and class), affine-free
                module.elementwise_affine = False
                module.register_parameter("weight", None)
                module.register_parameter("bias", None)
                folded.append(name)
            continue
        affine = _channel_affine(module) if not isinstance(module, _PRODUCERS) else None
        if affine is None:
            continue
        a, c = affine
        if producer is not None and _channels_match(producer, module, a):
            _fold_into_producer(producer, a, c)
        elif consumers and nn.Linear in _channel_layers(module) and all(
                isinstance(m, nn.Linear) and m.in_features == a.numel() for m in consumers):
            for consumer in consumers:
                _fold_into_consumer(consumer, a, c)
        else:
            continue
        model.set_submodule(name, nn.Identity())
        folded.append(name)
    logger.info("fold_norms: baked %d standardized convs, folded %s", len(baked), folded)
    after = _outputs(model, example_inputs)
    if before is not None:
        _check_same(before, after)
    return model


def _check_same(before: Any, after: Any) -> None:
    flat_before, flat_after = torch.utils._pytree.tree_leaves(before), torch.utils._pytree.tree_leaves(after)
    for x, y in zip(flat_before, flat_after):
        if isinstance(x, Tensor) and x.is_floating_point():
            # the folded parameters are rounded once to their dtype: allow that rounding, compounded, not more
            tol = 1e-9 if x.dtype == torch.float64 else 1e3 * torch.finfo(x.dtype).eps
            # a non-finite output (from a NaN input, say) must stay exactly that; the finite ones move by rounding
            finite = x.isfinite()
            same_elsewhere = torch.equal(x[~finite].nan_to_num(), y[~finite].nan_to_num())
            if not (torch.equal(finite, y.isfinite()) and same_elsewhere):
                raise RuntimeError("fold_norms: outputs changed: NaN or infinite values appeared, vanished or "
                                   "changed sign")
            if not finite.any():
                continue
            error = (x[finite].double() - y[finite].double()).abs().max() / x[finite].abs().max().clamp_min(1.0)
            if not error <= tol:
                raise RuntimeError(f"fold_norms: outputs changed by {error:.3g} (relative; tolerance {tol:.1g})")
    if len(flat_before) != len(flat_after):
        warnings.warn("fold_norms: the model's output structure changed", stacklevel=3)
