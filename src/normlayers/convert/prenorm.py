"""Exact Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (Jiang et al., NeurIPS 2023, arXiv 2305.14858; the steps
of the authors' ``example.py``, ZixuanJiang/pre-rmsnorm-transformer).

A Pre-LN transformer reads its residual stream only through LayerNorms, which remove the mean. So the stream may be
kept zero-mean instead (recentre everything that writes it), after which each LayerNorm is an RMSNorm; a zero-mean
vector is also determined by its first ``d − 1`` coordinates, which gives the compressed CRMSNorm variant. The paper's
norms have no affine, so each LayerNorm's ``γ, β`` are first folded into the linear maps that read its output.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers.nn.row_norms import CRMSNorm, RMSNorm

__all__ = ["OutputRMSNorm", "PreNormSpec", "RecentredNorm", "prenorm_spec", "prenorm_to_crmsnorm",
           "prenorm_to_rmsnorm", "token_inputs"]

logger = logging.getLogger("normlayers")


@dataclass
class PreNormSpec:
    """Where a Pre-LN transformer writes and reads its residual stream (names are ``named_modules`` /
    ``named_parameters`` names).

    Attributes:
        width: ``d``, the stream width.
        writers: modules whose output is added to the stream: ``nn.Embedding`` (token/position tables),
            ``nn.Linear``, Hugging Face ``Conv1D`` (GPT-2) or ``nn.Conv2d`` (patch embeddings, output channels).
            They are recentred (and compressed).
        stream_params: parameters added to the stream directly, stream on the last dim (cls token, position table).
        norms: each block norm → the ``nn.Linear``/``Conv1D`` modules that read its output, and nothing else.
        output_norms: final norms whose output leaves the model (e.g. ``ViTModel.layernorm``): they keep their affine
            (and restore the dropped coordinate) as :class:`OutputRMSNorm`.
        example_inputs: positional inputs for the check that the converted model gives the same outputs.
        outputs: picks the tensors to compare from the model's output. Default: the output itself, or the
            ``logits`` / ``last_hidden_state`` + ``pooler_output`` of a Hugging Face output.
        not_compressible: why the model cannot run on a ``d − 1`` stream, if it cannot (CRMSNorm is then refused).
        layer_scales: writer → the per-channel scale applied to its output before the stream (timm's
            ``LayerScale``, parameter ``gamma``): folded into the writer first, then set to ones.
        input_norms: norms whose output *is* the start of the stream (timm's ``norm_pre``): kept, and followed by a
            recentring (and compression) of their output, as :class:`RecentredNorm`. The writers before them do not
            write the stream and are not listed.
        branch_norms: norms inside a residual branch that never read the stream (QK-norms, timm's ``attn.norm`` /
            ``mlp.norm``): left as they are.
    """

    width: int
    writers: list[str]
    norms: dict[str, list[str]]
    stream_params: list[str] = field(default_factory=list)
    output_norms: list[str] = field(default_factory=list)
    example_inputs: Optional[Callable[[nn.Module], tuple]] = None
    outputs: Optional[Callable[[Any], list[Tensor]]] = None
    not_compressible: Optional[str] = None
    layer_scales: dict[str, str] = field(default_factory=dict)
    input_norms: list[str] = field(default_factory=list)
    branch_norms: list[str] = field(default_factory=list)


class OutputRMSNorm(nn.Module):
    r"""The final norm of a converted model whose normalized stream is itself an output (``ViTModel``'s
    ``last_hidden_state``): RMSNorm (CRMSNorm on a compressed stream, then the dropped coordinate ``−Σx'`` restored)
    followed by the original LayerNorm's affine. On a zero-mean stream it equals that LayerNorm.

    .. math:: y = \mathrm{RMSNorm}(x) \cdot \gamma + \beta

    Parameters ``weight`` and ``bias`` keep the LayerNorm's names and shape ``(d,)``.

    Args:
        width (int): ``d``, the full width.
        eps (float): added to the mean square. Default: ``1e-5``.
        compressed (bool): the input holds the first ``d − 1`` coordinates. Default: ``False``.
        elementwise_affine, bias (bool): as :class:`torch.nn.LayerNorm`. Default: ``True``.
        device, dtype: factory kwargs.
    """

    def __init__(self, width: int, eps: float = 1e-5, compressed: bool = False, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.width, self.eps, self.compressed = width, eps, compressed
        self.weight = nn.Parameter(torch.empty(width, **factory_kwargs)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(width, **factory_kwargs)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, compressed={self.compressed}"

    def forward(self, input: Tensor) -> Tensor:
        if self.compressed:
            y = F.crms_norm(input, (self.width - 1,), None, self.eps)
            y = torch.cat([y, -y.sum(-1, keepdim=True)], dim=-1)
        else:
            y = F.rms_norm(input, (self.width,), None, self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


class RecentredNorm(nn.Module):
    r"""A norm whose output starts the residual stream (timm's ``norm_pre``), kept as it is and followed by the
    recentring that makes the stream zero-mean; on a compressed stream only the first ``d − 1`` coordinates are kept.

    .. math:: y = n(x) - \overline{n(x)}, \qquad \overline{v} = \tfrac{1}{d}\textstyle\sum_i v_i

    Args:
        norm (nn.Module): the original norm (its parameters are kept, under ``norm.``).
        compressed (bool): return the first ``d − 1`` coordinates. Default: ``False``.
    """

    def __init__(self, norm: nn.Module, compressed: bool = False) -> None:
        super().__init__()
        self.norm, self.compressed = norm, compressed

    def extra_repr(self) -> str:
        return f"compressed={self.compressed}"

    def forward(self, input: Tensor) -> Tensor:
        y = self.norm(input)
        y = y - y.mean(-1, keepdim=True)
        return y[..., :-1] if self.compressed else y


# ----------------------------------------------------------------------------------------------------------------------
# Built-in descriptions
# ----------------------------------------------------------------------------------------------------------------------


def _hf_outputs(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if getattr(output, "logits", None) is not None:
        return [output.logits]
    return [t for t in (getattr(output, "last_hidden_state", None), getattr(output, "pooler_output", None))
            if t is not None]


def token_inputs(vocab: int, length: int) -> Callable[[nn.Module], tuple]:
    """An ``example_inputs`` for a language model: two fixed random sequences of ``length`` token ids."""
    def make(model: nn.Module) -> tuple:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        return (torch.randint(0, vocab, (2, length), generator=generator, device=device),)
    return make


def _spec_gpt2(model: nn.Module) -> PreNormSpec:
    config = model.config
    lm = hasattr(model, "lm_head")
    prefix = "transformer." if lm else ""
    if getattr(config, "add_cross_attention", False):
        raise ValueError(f"{prefix}h.0.crossattention: GPT-2 with cross-attention reads encoder states through "
                         f"ln_cross_attn; only self-attention Pre-LN blocks are supported")
    writers, norms = [f"{prefix}wte", f"{prefix}wpe"], {}
    for i in range(config.n_layer):
        block = f"{prefix}h.{i}"
        writers += [f"{block}.attn.c_proj", f"{block}.mlp.c_proj"]
        norms[f"{block}.ln_1"] = [f"{block}.attn.c_attn"]
        norms[f"{block}.ln_2"] = [f"{block}.mlp.c_fc"]
    output_norms = []
    if lm:
        norms[f"{prefix}ln_f"] = ["lm_head"]
    else:
        output_norms.append("ln_f")
    # GPT2Model reshapes ln_f's output with the width of the stream before it: it cannot return d from a d − 1 stream
    not_compressible = None if lm else "GPT2Model reshapes its output with the stream width; use GPT2LMHeadModel"
    return PreNormSpec(config.n_embd, writers, norms, output_norms=output_norms,
                       example_inputs=token_inputs(config.vocab_size, min(8, config.n_positions)), outputs=_hf_outputs,
                       not_compressible=not_compressible)


def _spec_vit(model: nn.Module) -> PreNormSpec:
    config = model.config
    classifier = hasattr(model, "classifier")
    prefix = "vit." if classifier else ""
    base = model.vit if classifier else model
    writers = [f"{prefix}embeddings.patch_embeddings.projection"]
    stream_params = [f"{prefix}embeddings.cls_token", f"{prefix}embeddings.position_embeddings"]
    if base.embeddings.mask_token is not None:
        stream_params.append(f"{prefix}embeddings.mask_token")
    norms = {}
    # transformers 5 holds the blocks in `layers` (4.x: `encoder.layer`, with other submodule names, which the
    # check of the spec then reports)
    blocks = "layers" if hasattr(base, "layers") else "encoder.layer"
    for i in range(len(base.get_submodule(blocks))):
        layer = f"{prefix}{blocks}.{i}"
        writers += [f"{layer}.attention.o_proj", f"{layer}.mlp.fc2"]
        norms[f"{layer}.layernorm_before"] = [f"{layer}.attention.{p}_proj" for p in "qkv"]
        norms[f"{layer}.layernorm_after"] = [f"{layer}.mlp.fc1"]
    output_norms = []
    if classifier and isinstance(model.classifier, nn.Linear):
        norms[f"{prefix}layernorm"] = ["classifier"]
    else:
        output_norms.append(f"{prefix}layernorm")

    def pixels(model: nn.Module) -> tuple:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (2, config.num_channels, config.image_size, config.image_size)
        return (torch.randn(shape, generator=generator, device=device),)

    return PreNormSpec(config.hidden_size, writers, norms, stream_params, output_norms, pixels, _hf_outputs)


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _timm_vit_readers(block: str, part: str, module: nn.Module, names: tuple[tuple[str, ...], ...]) -> list[str]:
    """The linear maps of a block's ``attn``/``mlp`` that read its norm's output: the first of ``names`` (a tuple of
    attribute names) that the module has, all of them ``nn.Linear``."""
    for group in names:
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in group):
            return [f"{block}.{part}.{n}" for n in group]
    raise ValueError(f"{block}.{part} is a {type(module).__name__}: its input projections are not one of "
                     f"{[list(g) for g in names]} (nn.Linear); describe the model with a PreNormSpec")


def _spec_timm_vit(model: nn.Module) -> PreNormSpec:
    """timm's ``VisionTransformer`` (``timm/models/vision_transformer.py``): the stream starts as patch projection +
    class/register tokens + position table (or as ``norm_pre``'s output), each ``Block`` writes it through
    ``attn.proj`` and ``mlp.fc2`` (times ``ls1``/``ls2``), and it is read by ``norm1``/``norm2``, then by ``norm`` or,
    after average/token pooling, ``fc_norm``, which feed ``head`` (or are the output)."""
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("attn_pool: attention pooling reads the stream through its own projections and norm, not "
                         "only through a LayerNorm; only global_pool in ('', 'token', 'avg') is supported")
    pool = model.global_pool
    if pool not in ("", "token", "avg"):
        raise ValueError(f"global_pool={pool!r}: max pooling does not keep the stream zero-mean; only '', 'token' "
                         f"and 'avg' (linear poolings) are supported")
    if not _is_identity(getattr(model.patch_embed, "norm", None)):
        raise ValueError("patch_embed.norm: a norm of the patch embedding before the stream is not a Pre-LN stream "
                         "norm; not supported")
    width = model.embed_dim
    writers, stream_params, input_norms = [], [], []
    if _is_identity(model.norm_pre):
        writers.append("patch_embed.proj")
        stream_params = [name for name in ("cls_token", "reg_token", "pos_embed") if getattr(model, name) is not None]
    else:
        input_norms.append("norm_pre")
    norms: dict[str, list[str]] = {}
    layer_scales: dict[str, str] = {}
    branch_norms: list[str] = []
    for i, blk in enumerate(model.blocks):
        block = f"blocks.{i}"
        if type(blk).__name__ != "Block":
            raise ValueError(f"{block} is a {type(blk).__name__}, not timm's Pre-LN Block (norm → branch → "
                             f"residual add); only Block is supported")
        norms[f"{block}.norm1"] = _timm_vit_readers(block, "attn", blk.attn, (("qkv",), ("q", "kv")))
        norms[f"{block}.norm2"] = _timm_vit_readers(block, "mlp", blk.mlp, (("fc1",), ("fc1_g", "fc1_x")))
        for writer, scale in (("attn.proj", "ls1"), ("mlp.fc2", "ls2")):
            writers.append(f"{block}.{writer}")
            if not _is_identity(getattr(blk, scale)):
                layer_scales[f"{block}.{writer}"] = f"{block}.{scale}"
        branch_norms += [f"{block}.{n}" for n in ("attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm")
                         if not _is_identity(blk.get_submodule(n) if _has_submodule(blk, n) else None)]
    output_norms = []
    head = model.head if isinstance(model.head, nn.Linear) else None
    for final in ("norm", "fc_norm"):
        if _is_identity(getattr(model, final)):
            continue
        if head is not None:
            norms[final] = ["head"]
        else:
            output_norms.append(final)

    def pixels(model: nn.Module) -> tuple:
        proj = model.patch_embed.proj
        generator = torch.Generator(device=proj.weight.device).manual_seed(0)
        shape = (2, proj.in_channels, *model.patch_embed.img_size)
        return (torch.randn(shape, generator=generator, device=proj.weight.device, dtype=proj.weight.dtype),)

    return PreNormSpec(width, writers, norms, stream_params, output_norms, pixels, layer_scales=layer_scales,
                       input_norms=input_norms, branch_norms=branch_norms)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


_HF_SPECS = {
    "GPT2Model": _spec_gpt2, "GPT2LMHeadModel": _spec_gpt2,
    "ViTModel": _spec_vit, "ViTForImageClassification": _spec_vit,
}


def prenorm_spec(model: nn.Module) -> PreNormSpec:
    """The :class:`PreNormSpec` of ``model``: its own, when it has a ``prenorm_spec()`` method (as
    :class:`normlayers.testing.models.TransformerLM` does), else the built-in one of timm's ``VisionTransformer``,
    Hugging Face ``GPT2Model``/``GPT2LMHeadModel`` and ``ViTModel``/``ViTForImageClassification``. Other models:
    write one."""
    describe = getattr(model, "prenorm_spec", None)
    if callable(describe):
        return describe()
    if type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("timm."):
        return _spec_timm_vit(model)
    make = _HF_SPECS.get(type(model).__name__)
    if make is None or not hasattr(model, "config"):
        raise TypeError(f"no built-in description of {type(model).__name__}'s residual stream (built in: timm "
                        f"VisionTransformer, {', '.join(_HF_SPECS)}, and models with a prenorm_spec() method); pass "
                        f"spec=PreNormSpec(...) for a Pre-LN model")
    return make(model)


# ----------------------------------------------------------------------------------------------------------------------
# The algebra, on fp64 copies
# ----------------------------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's transposed linear (GPT-2): ``y = x @ weight + bias``, weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _out_axis(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding) or _is_conv1d(module):
        return 1
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return 0
    raise TypeError(f"{type(module).__name__} cannot write the stream (expected nn.Embedding, nn.Linear, Conv1D or "
                    f"nn.Conv2d)")


def _in_axis(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return 1
    if _is_conv1d(module):
        return 0
    raise TypeError(f"{type(module).__name__} cannot read a norm's output (expected nn.Linear or Conv1D)")


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _store(module: nn.Module, name: str, value: Tensor) -> None:
    """Write ``value`` into ``module.<name>``: in place when the shape is unchanged (the Parameter object, and the
    optimizer's reference to it, survive), else as a new Parameter of the old dtype."""
    old = getattr(module, name)
    if old is not None and old.shape == value.shape:
        with torch.no_grad():
            old.copy_(value)
        return
    template = old if old is not None else module.weight
    setattr(module, name, nn.Parameter(value.to(template.dtype), requires_grad=template.requires_grad))


def _set_width(module: nn.Module, axis_is_output: bool, width: int) -> None:
    if isinstance(module, nn.Embedding):
        module.embedding_dim = width
    elif isinstance(module, nn.Linear):
        setattr(module, "out_features" if axis_is_output else "in_features", width)
    elif isinstance(module, nn.Conv2d):
        module.out_channels = width
    elif _is_conv1d(module):
        setattr(module, "nf" if axis_is_output else "nx", width)


def _check_spec(model: nn.Module, spec: PreNormSpec) -> None:
    d = spec.width
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name in [*spec.writers, *spec.norms, *spec.output_norms, *(c for cs in spec.norms.values() for c in cs)]:
        if name not in modules:
            raise ValueError(f"the spec names {name!r}, which is not a module of {type(model).__name__}")
    for name in spec.writers:
        module = modules[name]
        if module.weight.shape[_out_axis(module)] != d:
            raise ValueError(f"{name} writes width {module.weight.shape[_out_axis(module)]}, not the stream width {d}")
    for name in spec.stream_params:
        if name not in params or params[name].shape[-1] != d:
            raise ValueError(f"{name} is not a parameter with last dim {d} (the stream width)")
    for name in [*spec.norms, *spec.output_norms]:
        norm = modules[name]
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"{name} is a {type(norm).__name__}, not a LayerNorm (already converted?)")
        if tuple(norm.normalized_shape) != (d,):
            raise ValueError(f"{name} normalizes over {list(norm.normalized_shape)}, not the stream width [{d}]")
    for consumers in spec.norms.values():
        for name in consumers:
            module = modules[name]
            if module.weight.shape[_in_axis(module)] != d:
                raise ValueError(f"{name} reads width {module.weight.shape[_in_axis(module)]}, not {d}")
    for writer, scale in spec.layer_scales.items():
        if writer not in spec.writers:
            raise ValueError(f"the spec scales {writer!r}, which is not one of its writers")
        gamma = getattr(modules.get(scale), "gamma", None)
        if not isinstance(gamma, Tensor) or tuple(gamma.shape) != (d,):
            raise ValueError(f"{scale} has no per-channel scale 'gamma' of shape ({d},)")
    known = set(spec.norms) | set(spec.output_norms) | set(spec.input_norms) | set(spec.branch_norms)
    for name, module in modules.items():
        if name not in known and ("Norm" in type(module).__name__ or isinstance(module, nn.LayerNorm)):
            raise ValueError(f"{name} ({type(module).__name__}) is a norm outside the spec's residual stream: it may "
                             f"read something other than the stream (a Post-LN sum, an embedding norm, a QK-norm), "
                             f"which breaks the conversion's precondition. Describe it in a PreNormSpec if it is a "
                             f"stream norm")


def _untie(model: nn.Module, spec: PreNormSpec, untie_embeddings: bool) -> None:
    """Refuse parameters the conversion changes that are reachable under several names, or give consumers their own
    copy (``untie_embeddings``)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    modules = dict(model.named_modules())
    consumers = [c for cs in spec.norms.values() for c in cs]
    touched = {name: modules[name] for name in [*spec.writers, *consumers]}

    def shared(module_name: str) -> Optional[list[str]]:
        weight = touched[module_name].weight
        return names[id(weight)] if len(names[id(weight)]) > 1 else None

    for name in consumers:
        if shared(name) and untie_embeddings:
            weight = modules[name].weight
            modules[name].weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "tie_word_embeddings"):
                config.tie_word_embeddings = False  # or Hugging Face's tie_weights() would tie them again
    names.clear()
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name in sorted(touched, key=lambda n: n not in consumers):  # report from the reader's side first
        aliases = shared(name)
        if aliases:
            reader = any(alias.rpartition(".")[0] in consumers for alias in aliases)
            hint = " Pass untie_embeddings=True to give the reader its own copy." if reader else ""
            raise ValueError(f"{name}.weight is tied ({', '.join(aliases)}): the conversion changes the writer and "
                             f"the reader of the stream differently.{hint}")


def _convert(model: nn.Module, spec: Optional[PreNormSpec], compress: bool, untie_embeddings: bool,
             verify: bool) -> nn.Module:
    if spec is None:
        spec = prenorm_spec(model)
    _check_spec(model, spec)
    if compress and spec.not_compressible:
        raise ValueError(f"{type(model).__name__} cannot be compressed to Pre-CRMSNorm: {spec.not_compressible}")
    _untie(model, spec, untie_embeddings)
    if model.training:
        warnings.warn("the converted model is exact for inference; training it needs the zero-mean "
                      "re-parametrisation of Jiang et al. (dropout also breaks the zero mean)", stacklevel=3)
    reference = _run(model, spec) if verify else None
    d = spec.width
    keep = slice(0, d - 1) if compress else slice(0, d)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())

    # Step 0: fold each block norm's affine into its readers (docs/convert.md).
    for norm_name, consumers in spec.norms.items():
        norm = modules[norm_name]
        gamma = _f64(norm.weight) if norm.weight is not None else None
        beta = _f64(norm.bias) if norm.bias is not None else None
        for name in consumers:
            lin = modules[name]
            axis = _in_axis(lin)
            w = _f64(lin.weight)
            b = _f64(lin.bias) if lin.bias is not None else torch.zeros(w.shape[1 - axis], dtype=torch.float64,
                                                                          device=w.device)
            if beta is not None:
                b = b + (w @ beta if axis == 1 else beta @ w)
            if gamma is not None:
                w = w * (gamma if axis == 1 else gamma[:, None])
            if compress:  # W[:, :-1] − W[:, -1:] on the input axis (step 3)
                w = w.narrow(axis, 0, d - 1) - w.narrow(axis, d - 1, 1)
            _store(lin, "weight", w)
            if lin.bias is not None or beta is not None:
                _store(lin, "bias", b)
            _set_width(lin, False, keep.stop)

    # Step 1: recentre (and compress) everything that writes the stream, after folding a per-channel output scale
    # into the writer (timm's LayerScale: diag(γ)·(Wx + b)).
    for name in spec.writers:
        module = modules[name]
        if name in spec.layer_scales:
            scale = modules[spec.layer_scales[name]]
            gamma = _f64(scale.gamma)
            along_out = [-1 if dim == _out_axis(module) else 1 for dim in range(module.weight.dim())]
            _store(module, "weight", _f64(module.weight) * gamma.view(along_out))
            if module.bias is not None:
                _store(module, "bias", _f64(module.bias) * gamma)
            _store(scale, "gamma", torch.ones(keep.stop, dtype=torch.float64, device=gamma.device))
        axis = _out_axis(module)
        w = _f64(module.weight)
        w = (w - w.mean(axis, keepdim=True)).narrow(axis, 0, keep.stop)
        _store(module, "weight", w)
        if getattr(module, "bias", None) is not None:
            b = _f64(module.bias)
            _store(module, "bias", (b - b.mean())[keep])
        _set_width(module, True, keep.stop)
    for name in spec.stream_params:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = _f64(params[name])
        _store(owner, leaf, (p - p.mean(-1, keepdim=True))[..., keep])

    for name in spec.input_norms:
        model.set_submodule(name, RecentredNorm(modules[name], compress))

    # Step 2/3: the norms.
    for name in [*spec.norms, *spec.output_norms]:
        norm = modules[name]
        factory = {"device": (norm.weight.device if norm.weight is not None else None),
                   "dtype": (norm.weight.dtype if norm.weight is not None else None)}
        if name in spec.output_norms:
            new = OutputRMSNorm(d, norm.eps, compress, norm.weight is not None, norm.bias is not None, **factory)
            if norm.weight is not None:
                new.weight = norm.weight
            if norm.bias is not None:
                new.bias = norm.bias
        elif compress:
            new = CRMSNorm(d - 1, eps=norm.eps, elementwise_affine=False, **factory)
        else:
            new = RMSNorm(d, eps=norm.eps, elementwise_affine=False, **factory)
        new.train(norm.training)
        model.set_submodule(name, new)

    logger.info("%s: %d norms converted to %s", type(model).__name__, len(spec.norms) + len(spec.output_norms),
                "CRMSNorm" if compress else "RMSNorm")
    if reference is not None:
        _compare(reference, _run(model, spec), type(model).__name__)
    return model


def _run(model: nn.Module, spec: PreNormSpec) -> Optional[list[Tensor]]:
    if spec.example_inputs is None:
        warnings.warn("the conversion is not verified: the spec has no example_inputs", stacklevel=4)
        return None
    if next(model.parameters()).device.type == "meta":
        return None
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            output = model(*spec.example_inputs(model))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return (spec.outputs or _hf_outputs)(output)


def _compare(before: list[Tensor], after: list[Tensor], what: str) -> None:
    for expected, actual in zip(before, after):
        # The conversion is exact algebra, so only rounding remains: fp64 1e-9; otherwise the dtype's rounding
        # compounded through the depth of the model, relative to the output's scale.
        tol = 1e-9 if expected.dtype == torch.float64 else 1e3 * torch.finfo(expected.dtype).eps
        scale = expected.abs().max().clamp_min(1.0)
        error = (actual.double() - expected.double()).abs().max() / scale
        if not error <= tol:
            raise RuntimeError(f"{what}: the converted model's outputs differ from the original's by {error:.3g} "
                               f"(relative; tolerance {tol:.1g}). The model has been modified; reload it. This "
                               f"means it is not a Pre-LN model as its spec describes")


def prenorm_to_rmsnorm(model: nn.Module, spec: Optional[PreNormSpec] = None, *, untie_embeddings: bool = False,
                       verify: bool = True) -> nn.Module:
    """Convert a Pre-LN transformer to the equivalent Pre-RMSNorm one, in place; returns ``model``.

    Steps 0–2 of docs/convert.md: every block LayerNorm's ``γ, β`` are folded into the linear maps reading its output
    (a bias is created where there was none); token/position embeddings, cls tokens, patch projections and the
    residual branches' output projections are recentred so the stream stays zero-mean; each LayerNorm becomes an
    affine-free :class:`normlayers.RMSNorm` with the same eps. Final norms whose output leaves the model become
    :class:`OutputRMSNorm`. Outputs equal the original's to rounding (fp64: 1e-9 relative); hidden states inside
    the model are the recentred ones. The algebra runs in fp64, then each parameter is rounded to its dtype.

    Args:
        model (nn.Module): a built-in model (:func:`prenorm_spec`) or any Pre-LN model described by ``spec``.
        spec (PreNormSpec, optional): where the stream is written and read. Default: :func:`prenorm_spec`.
        untie_embeddings (bool, keyword-only): a reader of the stream tied to a writer (GPT-2's ``lm_head`` and
            ``wte``) gets its own copy, and ``config.tie_word_embeddings`` is set to ``False``; otherwise tied
            weights are refused. Default: ``False``.
        verify (bool, keyword-only): run ``spec.example_inputs`` before and after (in eval mode) and raise if the
            outputs differ. Default: ``True``.

    Refused, before anything changes, with a message naming the module: Post-LN blocks, norms outside the
    described stream (cross-attention, embedding or QK norms), tied weights (see ``untie_embeddings``), widths that
    do not match.

    Examples::

        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4)).eval()
        >>> normlayers.convert.prenorm_to_rmsnorm(model, untie_embeddings=True)
    """
    return _convert(model, spec, False, untie_embeddings, verify)


def prenorm_to_crmsnorm(model: nn.Module, spec: Optional[PreNormSpec] = None, *, untie_embeddings: bool = False,
                        verify: bool = True) -> nn.Module:
    """Convert a Pre-LN transformer to the equivalent Pre-CRMSNorm one, in place; returns ``model``.

    As :func:`prenorm_to_rmsnorm`, then step 3 of docs/convert.md: the zero-mean stream is stored in ``d − 1``
    coordinates (writers keep their first ``d − 1`` outputs; readers fold the dropped coordinate ``−Σx'`` in as
    ``W[:, :-1] − W[:, -1:]``) and each norm is an affine-free :class:`normlayers.CRMSNorm`. Embedding tables,
    projections and cls/position parameters get new, narrower Parameters. Same arguments and refusals.
    """
    return _convert(model, spec, True, untie_embeddings, verify)
