"""What the benchmark knows about an op: its shapes, its inputs, its implementations and its ideal memory traffic.

An :class:`Op` is everything the runner needs to benchmark one function of :mod:`normlayers.functional`:

* a :class:`ShapeKind` that parses and formats the ``--shapes`` of the op (``MxN`` rows, ``NxCxHxW`` activations,
  ``OxIxKHxKW`` conv weights, ...), and the default shapes per device type;
* ``make_inputs``, which builds an :class:`OpInputs`: the positional arguments of one call (tensors, buffers and
  Python values), which arguments get gradients and the output gradients, and which buffers a training call updates;
* its implementations, all called as ``fn(*inputs.args)`` and returning a tensor or a tuple of tensors named by
  ``output_names``: the eager reference (the ground truth, run in fp64), ``normlayers.functional``, and torch's own
  ops when torch has the op (``native``), plus peer libraries (``peers``, loaded only when used);
* a byte model: the tensors an ideal kernel reads and writes once (:class:`Transfer`), per mode.

Modes: ``fwd`` is inference (eval: running statistics read, not updated; no autograd graph); ``fwd_bwd`` is a
training forward (batch statistics, running statistics updated, statistics saved for backward) and its backward;
``bwd`` is that backward alone, of an untimed training forward.

The families live in one module each, named ``*_ops`` (:mod:`.row_ops`, :mod:`.cnn_ops`), each exporting ``OPS``, a
tuple of :class:`Op`; :data:`OPS` collects them from every such module of this package. benchmarks/README.md says how
to add one.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "FAMILY_MODULES",
    "MODES",
    "OPS",
    "Op",
    "OpFn",
    "OpInputs",
    "RandomInputs",
    "Shape",
    "ShapeKind",
    "Transfer",
    "compute_results",
    "ideal_bytes",
    "traffic",
    "traffic_formula",
]

MODES = ("fwd", "bwd", "fwd_bwd")

Shape = tuple[int, ...]
OpFn = Callable[..., Union[Tensor, tuple[Tensor, ...]]]


# ----------------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeKind:
    """The form of an op's shapes: named dims (``("M", "N")``) written ``MxN`` on the command line."""

    name: str
    dims: tuple[str, ...]
    meaning: str  # what the dims are, for error messages and --list-ops
    example: str

    @property
    def form(self) -> str:
        return "x".join(self.dims)

    def parse(self, text: str) -> Shape:
        """``"4096x8192"`` → ``(4096, 8192)``; a :class:`ValueError` saying the expected form otherwise."""
        parts = text.strip().lower().split("x")
        if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) != len(self.dims) \
                or any(int(p) == 0 for p in parts):
            raise ValueError(f"expected {self.form} ({self.meaning}) with {len(self.dims)} positive integers, "
                             f"e.g. {self.example}")
        return tuple(int(p) for p in parts)

    def format(self, shape: Shape) -> str:
        return "x".join(str(d) for d in shape)

    def sizes(self, shape: Shape) -> dict[str, int]:
        return dict(zip(self.dims, shape))


ROWS = ShapeKind("rows", ("M", "N"), "rows x normalized width", "4096x4096")
NCHW = ShapeKind("nchw", ("N", "C", "H", "W"), "batch x channels x height x width", "8x256x56x56")
CONV_WEIGHT = ShapeKind("conv_weight", ("O", "I", "KH", "KW"),
                        "out channels x in channels x kernel height x kernel width", "256x256x3x3")
TOKENS_TBC = ShapeKind("tokens_tbc", ("T", "B", "C"), "time x batch x channels (fairseq's time-major layout)",
                       "512x32x1024")
TOKENS_BNC = ShapeKind("tokens_bnc", ("B", "L", "C"), "batch x tokens x channels", "32x512x1024")
SPD_MATRICES = ShapeKind("spd", ("B", "N"), "batch x matrix size (B SPD matrices of N x N)", "256x32")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpInputs:
    """The arguments of one call, ``fn(*args)``.

    ``grads`` maps the name of each gradient (``"dx"``, ``"dweight"``, ...) to the index of its tensor in ``args``;
    ``grad_outputs`` are the gradients of the outputs for the backward; ``state`` maps the buffers a training call
    updates in place (``"running_var"``) to their index, so that their new values are checked too.
    """

    args: tuple
    grads: Mapping[str, int] = field(default_factory=dict)
    grad_outputs: tuple[Tensor, ...] = ()
    state: Mapping[str, int] = field(default_factory=dict)

    @property
    def grad_targets(self) -> dict[str, Tensor]:
        """The differentiable inputs, keyed by the name of their gradient."""
        return {name: self.args[i] for name, i in self.grads.items()}

    def to(self, dtype: Optional[torch.dtype] = None) -> OpInputs:
        """Copies of every floating tensor (buffers included) in ``dtype`` (``None``: each keeps its own), new leaves
        with the same ``requires_grad``: fp64 copies for the reference, and a fresh copy per provider, since a training
        call changes the running statistics."""

        def convert(value: object) -> object:
            if not isinstance(value, Tensor):
                return value
            copy = value.detach().to(dtype if value.is_floating_point() and dtype is not None else value.dtype,
                                     copy=True)
            return copy.requires_grad_(value.requires_grad)

        return OpInputs(tuple(convert(a) for a in self.args), self.grads,
                        tuple(convert(g) for g in self.grad_outputs), self.state)


class RandomInputs:
    """Seeded random tensors on one device, created in fp32 and rounded to their dtype (so that every dtype sees the
    same values up to rounding)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, training: bool, seed: int) -> None:
        self.device, self.dtype, self.training = device, dtype, training
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0, shift: float = 0.0, grad: bool = False,
               dtype: Optional[torch.dtype] = None) -> Tensor:
        """``shift + scale·N(0, 1)``; ``grad``: a leaf that requires grad in training."""
        t = torch.randn(*shape, generator=self._generator, device=self.device, dtype=torch.float32) * scale + shift
        return t.to(dtype or self.dtype).requires_grad_(grad and self.training)

    def grad_outputs(self, *shapes: Shape) -> tuple[Tensor, ...]:
        """N(0, 1) gradients for outputs of ``shapes`` (empty in inference)."""
        return tuple(self.normal(*s) for s in shapes) if self.training else ()


# ----------------------------------------------------------------------------------------------------------------------
# Byte model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One tensor an ideal kernel reads or writes once. ``extent`` is a product of dim names (``"MxN"``, ``"C"``,
    ``"NxG"``); ``fp32`` marks statistics and buffers kept in fp32 whatever the benchmark dtype."""

    direction: str
    tensor: str
    extent: str
    fp32: bool = False
    mask: bool = False  # a bool mask: one byte per element whatever the benchmark dtype

    def nbytes(self, sizes: Mapping[str, int], itemsize: int) -> int:
        elements = math.prod(sizes[d] for d in self.extent.split("x"))
        return elements * (4 if self.fp32 else 1 if self.mask else itemsize)

    def __str__(self) -> str:
        kind = ", fp32" if self.fp32 else ", bool" if self.mask else ""
        return f"{self.direction} {self.tensor}[{self.extent}{kind}]"


def read(tensor: str, extent: str, fp32: bool = False) -> Transfer:
    return Transfer("read", tensor, extent, fp32)


def read_mask(tensor: str, extent: str) -> Transfer:
    return Transfer("read", tensor, extent, mask=True)


def write(tensor: str, extent: str, fp32: bool = False) -> Transfer:
    return Transfer("write", tensor, extent, fp32)


# ----------------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One benchmarked function of :mod:`normlayers.functional` (see the module docstring).

    ``forward_traffic(training)`` and ``backward_traffic()`` are the byte model: the inference forward, the training
    forward (which also updates running statistics and stores what its backward reads), and the backward.
    ``extra_sizes(shape)`` adds dims the shape does not name (e.g. ``G``, the group count); ``check_shape(shape)``
    returns why the op cannot take a well-formed shape (e.g. channels not divisible by the groups), or ``None``.
    ``dtypes`` are the dtypes the op accepts: a suite's other dtypes are not run for it (SPD batch norm refuses fp16
    and bf16).
    """

    name: str
    family: str
    shape_kind: ShapeKind
    default_shapes: Mapping[str, tuple[Shape, ...]]  # by device type: "cuda", "cpu"
    make_inputs: Callable[[Shape, RandomInputs], OpInputs]
    output_names: tuple[str, ...]
    reference: OpFn
    normlayers: OpFn
    forward_traffic: Callable[[bool], list[Transfer]]
    backward_traffic: Callable[[], list[Transfer]]
    native: Optional[OpFn] = None  # torch's own ops; None: the torch provider runs the eager reference
    native_note: str = ""  # what the torch provider's row should say (e.g. "unfused add")
    # positions in the arguments of buffers the op updates in place (running statistics): the torch_fp32 provider
    # writes its fp32 copies of them back
    updated_args: tuple[int, ...] = ()
    has_kernels: bool = True  # False: normlayers runs plain PyTorch on every device
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes the op accepts
    peers: Mapping[str, Callable[[], OpFn]] = field(default_factory=dict)  # provider name -> builder
    extra_sizes: Callable[[Shape], dict[str, int]] = lambda shape: {}
    check_shape: Callable[[Shape], Optional[str]] = lambda shape: None

    def parse_shape(self, text: str) -> Shape:
        """A ``--shapes`` entry for this op; a :class:`ValueError` naming the op and the expected form otherwise."""
        try:
            shape = self.shape_kind.parse(text)
        except ValueError as exc:
            raise ValueError(f"bad shape {text!r} for {self.name}: {exc}") from None
        problem = self.check_shape(shape)
        if problem is not None:
            raise ValueError(f"bad shape {text!r} for {self.name}: {problem}")
        return shape

    def inputs(self, shape: Shape, dtype: torch.dtype, device: torch.device, training: bool,
               seed: int = 0) -> OpInputs:
        return self.make_inputs(shape, RandomInputs(device, dtype, training, seed))

    def sizes(self, shape: Shape) -> dict[str, int]:
        return {**self.shape_kind.sizes(shape), **self.extra_sizes(shape)}


def compute_results(op: Op, fn: OpFn, inputs: OpInputs, mode: str) -> dict[str, Tensor]:
    """Run ``fn`` once, untimed: its outputs and, in training modes (``bwd``, ``fwd_bwd``), the gradients of every
    differentiable input for ``grad_outputs`` and the updated buffers, keyed by name (``y``, ``dx``,
    ``running_var``)."""
    outputs = fn(*inputs.args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    results = dict(zip(op.output_names, outputs))
    if mode != "fwd":
        targets = inputs.grad_targets
        grads = torch.autograd.grad(outputs, tuple(targets.values()), inputs.grad_outputs)
        results.update(zip(targets.keys(), grads))
        results.update({name: inputs.args[i] for name, i in inputs.state.items()})
    return {name: t.detach().clone() for name, t in results.items()}


def traffic(op: Op, mode: str) -> list[Transfer]:
    """The minimum memory traffic of ``op`` in ``mode``: ``fwd`` the inference forward, ``bwd`` the backward,
    ``fwd_bwd`` the training forward plus the backward. Partial sums of multi-program reductions (e.g. per-block dW)
    are implementation overhead and not counted; see benchmarks/README.md for what "ideal" means for ops whose
    statistics span the whole batch."""
    if mode == "fwd":
        return op.forward_traffic(False)
    if mode == "bwd":
        return op.backward_traffic()
    if mode == "fwd_bwd":
        return op.forward_traffic(True) + op.backward_traffic()
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def ideal_bytes(op: Op, mode: str, shape: Shape, dtype: torch.dtype) -> int:
    """Bytes an ideal kernel moves for ``op`` in ``mode`` on ``shape`` in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = op.sizes(shape)
    return sum(t.nbytes(sizes, itemsize) for t in traffic(op, mode))


def traffic_formula(op: Op, mode: str) -> str:
    """The byte model in words, e.g. ``"read x[MxN] + read weight[N] + write y[MxN]"``."""
    return " + ".join(str(t) for t in traffic(op, mode))


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------

def _family_modules() -> tuple[str, ...]:
    """Every module of this package named ``*_ops``, in name order: a new family is a new file and nothing else."""
    package = importlib.import_module("normlayers.bench")
    return tuple(sorted(f"normlayers.bench.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                        if m.name.endswith("_ops")))


def _collect(modules: Sequence[str]) -> dict[str, Op]:
    ops: dict[str, Op] = {}
    for module_name in modules:
        for op in importlib.import_module(module_name).OPS:
            if op.name in ops:
                raise RuntimeError(f"op {op.name!r} is registered twice ({module_name})")
            ops[op.name] = op
    return ops


# One module per family, each with ``OPS: tuple[Op, ...]``. They import the names above from this (partly
# initialized) module, which is why this comes last.
FAMILY_MODULES: tuple[str, ...] = _family_modules()
OPS: dict[str, Op] = _collect(FAMILY_MODULES)
