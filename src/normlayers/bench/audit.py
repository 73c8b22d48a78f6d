"""A GPU-free audit of the kernels: launches per layer call, bytes moved against the byte model, and the static quality
of an sm_90 compile. Static and interpreter measurements, not GPU timings.

Three measurements, each runnable on a machine without a GPU:

* **Launches per layer call** (:func:`count_launches`): ``torch.profiler`` around one call of a layer on the
  ``triton`` backend under the Triton interpreter, forward and backward separately, in training and in eval. Counted as
  launches: every Triton kernel launch, plus every *leaf* ATen op (no ATen op beneath it) outside a Triton launch that
  would launch a CUDA kernel. An ATen op does not launch when it only allocates (``empty*``), when its results only
  alias its inputs without writing them (views, ``reshape``, ``detach``, a no-op ``to``), when it returns no tensor,
  or when every tensor it reads is empty. ``aten::item`` / ``aten::_local_scalar_dense`` are counted apart, as host
  syncs (a device-to-host copy that blocks the CPU), not as launches.
* **Bytes** (:func:`row_norm_traffic`): the interpreter's loads and stores are counted, mask-true lanes only:
  *logical* bytes are every lane of every access, *unique* bytes the distinct bytes each launch touches (DRAM traffic
  if every re-read hits a cache), summed over launches, divided by the op's byte model
  (:func:`normlayers.bench.ops.traffic`). Bytes are affine in the row count ``M`` once a persistent grid is full, so
  two small ``M`` give the line, evaluated at :data:`REFERENCE_ROWS`. The backward runs on the grid an H100 would
  get (:data:`H100_SMS` SMs times the programs per SM its compiled kernel can keep resident). The same counter gives
  *sector use* (:func:`sector_use`): requested bytes ÷ the bytes of the 32-byte sectors they lie in, bytes-weighted,
  per warp instruction of the sm_90 compile (each access split into warp instructions by its compiled layout and
  vector width, :mod:`normlayers.bench.warp_sectors`) and, for comparison, per ``tl.load``/``tl.store`` call of a
  whole program (the per-plane table, :func:`plane_sector_use`).
* **Static quality** (:func:`static_quality`): each row-norm kernel variant compiled for sm_90 by Triton's own
  compiler in a subprocess (the interpreter must be off); registers and spill bytes from ``ptxas -v`` as that Triton
  version runs it (its bundled ptxas, its flags), global load/store widths from ``cuobjdump -sass`` of the cubin
  (``LDG.E.128`` = 128-bit), and H100 occupancy (resident warps per SM ÷ 64) from registers, shared memory and
  ``num_warps``. The per-plane kernels of BatchChannelNorm2d and EvoNorm (:func:`plane_static_quality`) are compiled
  the same way, each launch captured from its launcher at an audited shape and memory format and specialized as
  Triton's JIT would specialize it.

``normlayers-bench --audit`` prints all three; ``python -m normlayers.bench.audit --markdown`` writes the table that
docs/benchmarking.md shows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from normlayers.bench import warp_sectors
from normlayers.bench.warp_sectors import SECTOR_BYTES, CompiledAccess

__all__ = [
    "H100_SMS", "REFERENCE_ROWS", "LayerCase", "layer_cases", "LaunchCount", "count_launches", "Traffic",
    "count_traffic", "sector_use", "RowNormTraffic", "row_norm_traffic", "liger_row_norm_traffic", "KernelQuality",
    "static_quality", "h100_resident_programs", "h100_occupancy", "PLANE_SHAPES", "PLANE_FORMATS",
    "plane_static_quality", "SectorUse", "plane_sector_use", "launch_accesses", "report", "main",
]

H100_SMS = 132
# H100 (sm_90) per-SM limits: registers, resident warps and blocks, shared memory (KiB 228, 1 KiB reserved per block).
H100_REGISTERS = 65536
H100_MAX_WARPS = 64
H100_MAX_BLOCKS = 32
H100_SHARED_BYTES = 233472
H100_SHARED_RESERVED = 1024
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256

# The bytes are reported as ratios at this many rows (the 8192-row H100 shapes).
REFERENCE_ROWS = 8192
# The widths the row norms are audited at (bf16): narrow, model widths, and the wide-row path.
ROW_WIDTHS = (1024, 4096, 8192, 16384, 65536)

SYNC_OPS = frozenset({"aten::item", "aten::_local_scalar_dense"})
ALLOCATING_OPS = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                            "aten::new_empty_strided", "aten::resize_", "aten::set_", "aten::lift_fresh"})
TRITON_RANGE = "triton::"


# ----------------------------------------------------------------------------------------------------------------------
# Launches per layer call
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _instrumented_interpreter() -> Iterator[None]:
    """Name every interpreted Triton launch ``triton::<kernel>`` in the profiler trace (and run the launch hooks)."""
    from torch.profiler import record_function
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        with record_function(TRITON_RANGE + self.fn.__name__), _current_launch(self.fn, args, kwargs):
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


@functools.lru_cache(maxsize=None)
def _aten_op_launches(name: str) -> bool:
    """Whether ATen op ``name`` can launch a kernel: it returns a tensor that is not a pure alias of an input."""
    if name in ALLOCATING_OPS or name in SYNC_OPS:
        return False
    packet = getattr(torch.ops.aten, name.split("::", 1)[1], None)
    if packet is None:
        return True
    for overload in packet.overloads():
        returns = getattr(packet, overload)._schema.returns
        tensors = [r for r in returns if "Tensor" in str(r.type)]
        if any(r.alias_info is None or r.alias_info.is_write for r in tensors):
            return True
    return False


def _reads_only_empty_tensors(shapes: Sequence) -> bool:
    tensor_shapes = [s for s in shapes if isinstance(s, (list, tuple)) and all(isinstance(d, int) for d in s)]
    return bool(tensor_shapes) and all(math.prod(s) == 0 for s in tensor_shapes if len(s) > 0)


@dataclass
class LaunchCount:
    """Launches of one phase of one layer call (see the module docstring for the rule)."""

    layer: str
    phase: str  # "train fwd", "train bwd", "eval fwd"
    triton: list[str] = field(default_factory=list)
    aten: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.aten)


def _classify(events, layer: str, phase: str) -> LaunchCount:
    count = LaunchCount(layer, phase)
    by_id = {id(e): e for e in events}

    def inside_triton(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith(TRITON_RANGE):
                return True
            parent = parent.cpu_parent
        return False

    for event in by_id.values():
        if event.name.startswith(TRITON_RANGE):
            if not inside_triton(event):
                count.triton.append(event.name[len(TRITON_RANGE):])
            continue
        if not event.name.startswith("aten::") or inside_triton(event):
            continue
        if event.name in SYNC_OPS:
            # _local_scalar_dense sits under item: count the outermost of the pair only.
            if event.cpu_parent is None or event.cpu_parent.name not in SYNC_OPS:
                count.syncs.append(event.name)
            continue
        if any(child.name.startswith("aten::") for child in event.cpu_children):
            continue
        if _aten_op_launches(event.name) and not _reads_only_empty_tensors(event.input_shapes or []):
            count.aten.append(event.name)
    return count


def _profile(fn: Callable[[], object]):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return prof.events()


def count_call_launches(fn: Callable[[], object], label: str = "call", phase: str = "call") -> LaunchCount:
    """The launches of one call of ``fn`` (the rule of the module docstring; Triton launches are seen only while
    the audit's instrumented interpreter is active, which :func:`count_launches` sets up)."""
    with _instrumented_interpreter():
        return _classify(_profile(fn), label, phase)


@dataclass(frozen=True)
class LayerCase:
    """A layer and an input to call it on: ``build(dtype)`` → module, ``inputs(dtype)`` → positional args."""

    label: str
    build: Callable[[torch.dtype], torch.nn.Module]
    inputs: Callable[[torch.dtype], tuple]


def _normal(*shape: int, seed: int = 0) -> Callable[[torch.dtype], torch.Tensor]:
    def make(dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)

    return make


def layer_cases() -> tuple[LayerCase, ...]:
    """The layers of the launch table, at the shapes of issue 16's table."""
    import normlayers

    image = _normal(2, 64, 14, 14)
    tokens = _normal(197, 2, 768)  # PowerNorm and UnifiedNorm take (T, B, C)
    rows = _normal(8, 4096)

    def region_inputs(dtype: torch.dtype) -> tuple:
        hole = torch.rand(2, 1, 14, 14, generator=torch.Generator().manual_seed(1)) > 0.5
        return image(dtype), hole

    return (
        LayerCase("LayerNorm(4096)", lambda d: normlayers.LayerNorm(4096, dtype=d), lambda d: (rows(d),)),
        LayerCase("RMSNorm(4096)", lambda d: normlayers.RMSNorm(4096, dtype=d), lambda d: (rows(d),)),
        LayerCase("RMSNorm(4096) + residual", lambda d: normlayers.RMSNorm(4096, dtype=d),
                  lambda d: (rows(d), _normal(8, 4096, seed=1)(d))),
        LayerCase("BatchChannelNorm2d(64)", lambda d: normlayers.BatchChannelNorm2d(64, dtype=d),
                  lambda d: (image(d),)),
        LayerCase("EvoNorm2dS0(64)", lambda d: normlayers.EvoNorm2dS0(64, dtype=d), lambda d: (image(d),)),
        LayerCase("EvoNorm2dB0(64)", lambda d: normlayers.EvoNorm2dB0(64, dtype=d), lambda d: (image(d),)),
        LayerCase("RegionNorm2d(64)", lambda d: normlayers.RegionNorm2d(64, dtype=d), region_inputs),
        LayerCase("LearnableRegionNorm2d(64)", lambda d: normlayers.LearnableRegionNorm2d(64, dtype=d),
                  lambda d: (image(d),)),
        LayerCase("GroupNorm(32, 64, act='silu')", lambda d: normlayers.GroupNorm(32, 64, act="silu", dtype=d),
                  lambda d: (image(d),)),
        LayerCase("GroupNorm(32, 64, act='silu'), channels-last",
                  lambda d: normlayers.GroupNorm(32, 64, act="silu", dtype=d),
                  lambda d: (image(d).contiguous(memory_format=torch.channels_last),)),
        LayerCase("PowerNorm(768)", lambda d: normlayers.PowerNorm(768, dtype=d), lambda d: (tokens(d),)),
        LayerCase("UnifiedNorm(768)", lambda d: normlayers.UnifiedNorm(768, dtype=d), lambda d: (tokens(d),)),
    )


def count_launches(case: LayerCase, dtype: torch.dtype = torch.bfloat16) -> dict[str, LaunchCount]:
    """Launches of ``case``'s layer on the ``triton`` backend: ``"train fwd"``, ``"train bwd"`` and ``"eval fwd"``.

    Each phase is run once untimed first (so one-time work, e.g. a first running-statistics update, is not counted),
    then once under the profiler. The backward gets a gradient for every floating output and starts with no
    parameter ``.grad`` (accumulating into an existing one is the optimizer's launch, not the layer's).
    """
    import normlayers

    torch.manual_seed(0)
    module = case.build(dtype)
    results: dict[str, LaunchCount] = {}

    def forward_on(args: tuple) -> Callable[[], tuple[torch.Tensor, ...]]:
        def forward() -> tuple[torch.Tensor, ...]:
            out = module(*args)
            return out if isinstance(out, tuple) else (out,)

        return forward

    def new_inputs(requires_grad: bool) -> tuple:
        return tuple(a.requires_grad_(requires_grad) if a.is_floating_point() else a for a in case.inputs(dtype))

    def backward(outputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
        grads = [torch.randn_like(o) for o in outputs]
        for p in module.parameters():
            p.grad = None
        return lambda: torch.autograd.backward(outputs, grads)

    with normlayers.backend("triton"), _instrumented_interpreter():
        module.train()
        backward(forward_on(new_inputs(True))())()
        results["train fwd"] = _classify(_profile(forward_on(new_inputs(True))), case.label, "train fwd")
        run_backward = backward(forward_on(new_inputs(True))())
        results["train bwd"] = _classify(_profile(run_backward), case.label, "train bwd")
        module.eval()
        with torch.no_grad():
            forward_on(new_inputs(False))()
            results["eval fwd"] = _classify(_profile(forward_on(new_inputs(False))), case.label, "eval fwd")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Bytes moved, counted in the interpreter
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes of the mask-true lanes of one launch's loads and stores, and the 32-byte sectors they touch, counted two
    ways: per ``tl.load``/``tl.store`` call of a whole program (``requested``/``sectors``), and per warp instruction
    (``warp_requested``/``warp_sectors``, counted only where :func:`count_traffic` has the compiled layouts)."""

    kernel: str
    logical: int = 0
    unique: int = 0
    requested: int = 0  # distinct bytes of each tl.load/tl.store call of each program, summed over calls
    sectors: int = 0  # distinct 32-byte sectors of each call of each program, summed over calls
    warp_requested: int = 0  # distinct bytes of the active lanes of each warp instruction, summed over instructions
    warp_sectors: int = 0  # distinct 32-byte sectors of each warp instruction, summed over instructions
    # Logical bytes of the interpreted loads/stores the compiled kernel does not issue (the compiler removed them as
    # dead: a load whose value no output uses), which count nothing per warp instruction.
    not_issued: int = 0


SECTOR_USE_UNITS = ("warp instruction", "program")


def sector_use(launches: Sequence[Traffic], per: str = "warp instruction") -> float:
    """Bytes-weighted sector use of several launches (one op's kernels): requested bytes ÷ bytes of the 32-byte
    sectors they lie in, counted ``per`` warp instruction (what a GPU fetches for each instruction: lanes of one warp
    instruction that share a sector share its fetch, other instructions fetch it again) or per ``tl.load``/``tl.store``
    call of a whole program (the tile's footprint, which is what the GPU fetches only where every re-fetch of a
    sector hits a cache). 1.0 when nothing is counted."""
    if per not in SECTOR_USE_UNITS:
        raise ValueError(f"per: expected one of {SECTOR_USE_UNITS}, got {per!r}")
    warp = per == "warp instruction"
    requested = sum(t.warp_requested if warp else t.requested for t in launches)
    sectors = sum(t.warp_sectors if warp else t.sectors for t in launches)
    return requested / (SECTOR_BYTES * sectors) if sectors else 1.0


class _TrafficRecorder:
    """Per launch: logical bytes, a byte map of each tensor argument marking the bytes touched (unique bytes), sectors
    per program call and, given the compiled ``accesses``, per warp instruction."""

    def __init__(self, accesses: Sequence[CompiledAccess]) -> None:
        import triton

        self.launches: list[Traffic] = []
        self._bases = None  # sorted start addresses of the launch's tensor arguments
        self._touched: list = []  # one bool array per argument storage, a flag per byte
        self._accesses = warp_sectors.SiteIndex(accesses)
        self._kernel: Optional[Callable] = None
        self._not_the_kernel = (str(Path(triton.__file__).parent), __file__, warp_sectors.__file__)

    def begin(self, kernel: Callable, tensors: Sequence[torch.Tensor]) -> None:
        import numpy as np

        self._kernel = kernel
        self.launches.append(Traffic(kernel.__name__))
        spans = sorted({(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors})
        self._bases = np.array([start for start, _ in spans], dtype=np.uint64)
        self._touched = [np.zeros(size, dtype=bool) for _, size in spans]

    def access(self, kind: str, pointers, mask, element_size: int) -> None:
        import numpy as np

        addresses = np.asarray(pointers)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)
        lanes = addresses[mask].astype(np.uint64).ravel()
        launch = self.launches[-1]
        if self._accesses:
            call = warp_sectors.interpreter_site(self._kernel.__name__, self._kernel.__code__.co_filename,
                                                 self._not_the_kernel)
            issued = self._accesses.issued(kind, call)
            if not issued and kind == "store":  # the compiler removes dead loads, never a store
                raise LookupError(f"{self._kernel.__name__}: the interpreter ran a store at {call} that the compiled "
                                  "kernel does not have")
            if not issued:
                launch.not_issued += lanes.size * element_size
            for compiled in issued:
                requested, sectors = warp_sectors.warp_sectors(compiled, addresses, mask)
                launch.warp_requested += requested
                launch.warp_sectors += sectors
        launch.logical += lanes.size * element_size
        # One call of one program: its distinct bytes against the distinct sectors holding them (an element never
        # straddles a sector: Triton's accesses are aligned to their element size).
        distinct = np.unique(lanes)
        launch.requested += distinct.size * element_size
        launch.sectors += np.unique(distinct // SECTOR_BYTES).size
        owner = np.searchsorted(self._bases, lanes, side="right") - 1
        for index in np.unique(owner):
            offsets = (lanes[owner == index] - self._bases[index]).astype(np.int64)
            for byte in range(element_size):
                self._touched[index][offsets + byte] = True

    def end(self) -> None:
        self.launches[-1].unique = int(sum(int(touched.sum()) for touched in self._touched))
        self._touched = []


_recorder: Optional[_TrafficRecorder] = None


@contextlib.contextmanager
def _current_launch(kernel: Callable, args: Sequence, kwargs: dict) -> Iterator[None]:
    if _recorder is None:
        yield
        return
    _recorder.begin(kernel, [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)])
    try:
        yield
    finally:
        _recorder.end()


@contextlib.contextmanager
def count_traffic(accesses: Sequence[CompiledAccess] = ()) -> Iterator[list[Traffic]]:
    """Count the bytes every interpreted Triton launch in the block loads and stores; yields the list it fills.

    With ``accesses`` (:func:`launch_accesses`: the global loads and stores of the compiled kernels the block
    launches) each load and store is also split into the warp instructions its compiled op issues and counted per
    instruction (:func:`normlayers.bench.warp_sectors.warp_sectors`); an access the compiled kernels lack (removed
    as dead code) counts as ``not_issued``."""
    from triton.runtime import interpreter

    global _recorder
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    recorder = _TrafficRecorder(accesses)

    def element_size(ptrs) -> int:
        return ptrs.get_element_ty().primitive_bitwidth // 8

    # The cache arguments after (ptrs, mask, other) / (ptrs, value, mask) differ between Triton versions (3.8: cache
    # modifier and eviction policy; 3.9: one cache policy): passed on as they come.
    def create_masked_load(self, ptrs, mask, other, *cache_args):
        recorder.access("load", ptrs.data, mask.data, element_size(ptrs))
        return load(self, ptrs, mask, other, *cache_args)

    def create_masked_store(self, ptrs, value, mask, *cache_args):
        recorder.access("store", ptrs.data, mask.data, element_size(ptrs))
        return store(self, ptrs, value, mask, *cache_args)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    _recorder = recorder
    try:
        with _instrumented_interpreter():
            yield recorder.launches
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        _recorder = None


@dataclass
class RowNormTraffic:
    """Bytes of one row-norm launch sequence at :data:`REFERENCE_ROWS` rows, as multiples of the byte model."""

    op: str
    phase: str  # "fwd" (training forward) or "bwd"
    width: int
    ideal_bytes: int
    logical: float
    unique: float
    launches: int
    programs: int = 0  # backward: the persistent grid emulated


def _ideal_bytes(op_name: str, phase: str, rows: int, width: int, dtype: torch.dtype) -> int:
    from normlayers.bench.ops import OPS

    op = OPS[op_name]
    transfers = op.forward_traffic(True) if phase == "fwd" else op.backward_traffic()
    sizes = op.sizes((rows, width))
    return sum(t.nbytes(sizes, torch.empty((), dtype=dtype).element_size()) for t in transfers)


_KINDS = {"layer_norm": ("layer", True), "rms_norm": ("rms", False), "crms_norm": ("crms", False)}


def row_norm_traffic(op_name: str, width: int, dtype: torch.dtype = torch.bfloat16, *, sm_count: int = H100_SMS,
                     programs_per_sm: Optional[int] = None, rows: int = REFERENCE_ROWS) -> list[RowNormTraffic]:
    """Forward and backward bytes of ``op_name`` (``layer_norm``, ``rms_norm``, ``crms_norm``) on ``(rows, width)``
    rows, divided by the byte model. The backward's persistent grid is ``sm_count`` SMs times ``programs_per_sm``
    (default: the launcher's own rule, as on a GPU with that many SMs); see :func:`_affine_bytes` for how it is
    reached without running thousands of interpreted programs."""
    from normlayers.kernels import row_norms as K

    kind, has_bias = _KINDS[op_name]
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")

    def run(phase: str) -> Callable[[int, int], list[Traffic]]:
        def measure(m: int, programs: int) -> list[Traffic]:
            x = torch.randn(m, width, generator=gen).to(dtype)
            weight = torch.randn(width, generator=gen).to(dtype)
            bias = torch.randn(width, generator=gen).to(dtype) if has_bias else None
            if phase == "fwd":
                with count_traffic() as launches:
                    K.row_norm_fwd(x, None, weight, bias, kind, 1e-5, 0.0, None)
                return launches
            _y, _res, mean, rstd = K.row_norm_fwd(x, None, weight, bias, kind, 1e-5, 0.0, None)
            dy = torch.randn(m, width, generator=gen).to(dtype)
            with count_traffic() as launches:
                K.row_norm_bwd(dy, x, None, weight, mean, rstd, kind, 0.0, has_bias, sm_count=programs,
                               programs_per_sm=1)
            return launches

        return measure

    results = []
    for phase in ("fwd", "bwd"):
        if phase == "fwd":
            plan = K.fwd_launch_plan(rows, width, dtype, cpu)
            programs = 1  # one program per row tile: every byte is per tile, none per grid
        else:
            plan = K.bwd_launch_plan(rows, width, dtype, cpu, sm_count=sm_count, programs_per_sm=programs_per_sm)
            programs = plan.programs
        logical, unique, count = _affine_bytes(run(phase), plan.block_m, rows, programs)
        ideal = _ideal_bytes(op_name, phase, rows, width, dtype)
        results.append(RowNormTraffic(op_name, phase, width, ideal, logical / ideal, unique / ideal, count,
                                      programs if phase == "bwd" else 0))
    return results


def _affine_bytes(measure: Callable[[int, int], list[Traffic]], block_m: int, rows: int,
                  programs: int) -> tuple[float, float, int]:
    """(logical, unique, launches) of ``rows`` rows on a grid of ``programs`` programs.

    While every program has at least one row tile, bytes are ``γ + α·P + β·M`` for ``P`` programs and ``M`` rows:
    ``β`` per row (x, dy, dx, the statistics, per-tile weight loads), ``α`` per program (its weight loads and its
    partial row, written and read back), ``γ`` per call (the reduced dW/dB). ``measure(M, P)`` is run at
    ``(B, 1)``, ``(2B, 1)`` and ``(2B, 2)`` rows and programs (``B`` rows per tile), which fixes the three, and the
    line is evaluated at ``(rows, programs)``; tests/bench/test_audit.py checks it against a direct measurement."""
    samples = [measure(m, p) for m, p in ((block_m, 1), (2 * block_m, 1), (2 * block_m, 2))]

    def solve(values: list[int]) -> float:
        beta = (values[1] - values[0]) / block_m
        alpha = values[2] - values[1]
        gamma = values[0] - alpha - beta * block_m
        return gamma + alpha * programs + beta * rows

    logical = solve([sum(t.logical for t in launches) for launches in samples])
    unique = solve([sum(t.unique for t in launches) for launches in samples])
    return logical, unique, len(samples[0])


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def liger_row_norm_traffic(op_name: str, width: int, dtype: torch.dtype = torch.bfloat16, *,
                           sm_count: int = H100_SMS, rows: int = REFERENCE_ROWS) -> Optional[RowNormTraffic]:
    """The backward of Liger-Kernel's ``rms_norm`` / ``layer_norm`` (liger-kernel 0.8), counted like ours; ``None``
    for widths its launcher refuses (``calculate_settings`` raises above 65536 columns).

    Its backward kernel is launched directly, on the grid its launcher uses on a GPU (one program per SM; on CPU its
    launcher runs one program in all), with fp32 statistics as its forward stores them. Its host-side
    ``_dW.sum(0)`` is an ATen op, not a Triton launch, so those bytes (``programs × N × 4`` read) are not counted.
    The zero ``offset`` goes in as an int: the interpreter passes a Python float through as a float, which has no
    ``.to`` (its forward, whose ``eps.to`` meets the same, is not measured)."""
    import math as _math

    from liger_kernel.ops import layer_norm as liger_ln, rms_norm as liger_rms
    from liger_kernel.ops.utils import calculate_settings, torch_to_triton_dtype

    gen = torch.Generator().manual_seed(0)
    try:
        block, warps = calculate_settings(width)
    except RuntimeError:
        return None

    def measure(m: int, programs: int) -> list[Traffic]:
        x = torch.randn(m, width, generator=gen).to(dtype)
        w = torch.randn(width, generator=gen).to(dtype)
        dy = torch.randn(m, width, generator=gen).to(dtype)
        x32 = x.float()
        mean = x32.mean(1)
        if op_name == "rms_norm":
            rstd = torch.rsqrt((x32 * x32).mean(1) + 1e-6)
        else:
            rstd = torch.rsqrt(x32.var(1, correction=0) + 1e-5)
        per_program = _math.ceil(m / programs)
        dx = torch.empty_like(x)
        dw = torch.empty(programs, width, dtype=torch.float32)
        db = torch.empty(programs, width, dtype=torch.float32)
        with count_traffic() as launches:
            if op_name == "rms_norm":
                liger_rms._rms_norm_backward_kernel[(programs,)](
                    dy, dy.stride(0), dx, dx.stride(0), x, x.stride(0), torch_to_triton_dtype[x.dtype], w, w.stride(0),
                    rstd, rstd.stride(0), dw, dw.stride(0), m, width, 0, per_program,
                    liger_rms._str_to_casting_mode["llama"], elementwise_affine=True, BLOCK_SIZE=block,
                    COMPUTE_DW=True, num_warps=warps)
            else:
                liger_ln._layer_norm_backward_kernel[(programs,)](
                    x, x.stride(0), w, mean, mean.stride(0), rstd, rstd.stride(0), dx, dx.stride(0), dw, dw.stride(0),
                    db, db.stride(0), dy, dy.stride(0), m, width, rows_per_program=per_program, BLOCK_SIZE=block,
                    COMPUTE_DW=True, COMPUTE_DB=True, num_warps=warps)
        return launches

    logical, unique, count = _affine_bytes(measure, 1, rows, sm_count)
    ideal = _ideal_bytes(op_name, "bwd", rows, width, dtype)
    return RowNormTraffic(op_name, "bwd", width, ideal, logical / ideal, unique / ideal, count, sm_count)


# ----------------------------------------------------------------------------------------------------------------------
# Static quality of an sm_90 compile
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class KernelQuality:
    """One compiled kernel variant: registers, spills, shared memory, global access widths, H100 residency."""

    kernel: str
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    load_bits: list[int]  # widths of the global loads in the SASS (LDG), one entry per distinct width
    store_bits: list[int]
    programs_per_sm: int
    occupancy: float  # resident warps per SM / 64


def h100_resident_programs(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Programs (thread blocks) an H100 SM keeps resident for a kernel of these registers/thread, shared memory and
    warps (the CUDA occupancy calculator's rule for sm_90)."""
    registers_per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (H100_REGISTERS // registers_per_warp) // num_warps
    by_warps = H100_MAX_WARPS // num_warps
    by_shared = H100_SHARED_BYTES // (shared_bytes + H100_SHARED_RESERVED)
    return max(min(by_registers, by_warps, by_shared, H100_MAX_BLOCKS), 0)


def h100_occupancy(registers: int, shared_bytes: int, num_warps: int) -> float:
    """Resident warps per H100 SM ÷ 64."""
    return h100_resident_programs(registers, shared_bytes, num_warps) * num_warps / H100_MAX_WARPS


def _ptxas_usage(ptx: str, options: Optional[dict] = None) -> tuple[int, int]:
    """(registers, spill bytes) that ``ptxas -v`` reports for the kernel in ``ptx`` when the installed Triton
    assembles it for sm_90 with the compile ``options``: Triton's own ptxas step runs again, with its bundled ptxas
    and the flags that version passes (Triton 3.8 and later add ``--regAllocOptLevel=2``, 3.6 does not, and the
    register allocation differs), and its log is read."""
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    report = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(report):
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas' log
        backend.make_cubin(ptx, {}, backend.parse_options(dict(options or {})), 90)
    report = report.getvalue()
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return registers, int(spills.group(1)) + int(spills.group(2))


def _sass_widths(cubin: bytes) -> tuple[list[int], list[int]]:
    """Distinct widths (bits) of the global loads and stores in the SASS of ``cubin`` (``cuobjdump -sass``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        cuobjdump = Path(get_ptxas(90).path).with_name("cuobjdump")
        sass = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout

    def widths(opcode: str) -> list[int]:
        found = set()
        for modifiers in re.findall(rf"\b{opcode}((?:\.[A-Z0-9_]+)*)", sass):
            sizes = [int(m) for m in re.findall(r"\.(\d+)\b", modifiers) if m in ("64", "128")]
            unsigned = re.search(r"\.(U8|S8|U16|S16)\b", modifiers)
            found.add(sizes[0] if sizes else 16 if unsigned and "16" in unsigned.group(1) else
                      8 if unsigned else 32)
        return sorted(found)

    return widths("LDG"), widths("STG")


def _compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int) -> KernelQuality:
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(signature) + list(constexprs)
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    # As the JIT specializes a launch whose pointers are 16-byte aligned and whose integers are multiples of 16
    # (true of every audited shape), so the compiler may vectorize as it would at run time.
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or kind in ("i32", "i64")}
    source = triton.compiler.ASTSource(fn=fn, signature=full, attrs=aligned,
                                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": num_warps}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    registers, spills = _ptxas_usage(compiled.asm["ptx"], options)
    loads, stores = _sass_widths(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    return KernelQuality(fn.__name__, num_warps, registers, spills, shared, loads, stores,
                         h100_resident_programs(registers, shared, num_warps),
                         h100_occupancy(registers, shared, num_warps))


def _row_norm_variants(kind: str, width: int, dtype: torch.dtype) -> dict[str, KernelQuality]:
    """Compile the forward and backward row-norm kernels (and the backward's partial reduction, if any) exactly as
    the launchers configure them for rows of ``width`` in ``dtype``."""
    from normlayers.kernels import row_norms as K

    return {phase: _compile_sm90(fn, signature, constexprs, warps)
            for phase, (fn, signature, constexprs, warps) in K.compile_specs(kind, width, dtype).items()}


def _static_worker(cases: list[tuple[str, int, str]]) -> list[dict]:
    return [{phase: asdict(q) for phase, q in _row_norm_variants(kind, width, getattr(torch, dtype)).items()}
            for kind, width, dtype in cases]


@functools.lru_cache(maxsize=None)
def _static_cached(cases: tuple[tuple[str, int, str], ...]) -> tuple[dict, ...]:
    code = ("import json, sys; from normlayers.bench.audit import _static_worker; "
            "print(json.dumps(_static_worker(json.loads(sys.argv[1]))))")
    return tuple(json_from_compile_subprocess(["-c", code, json.dumps(cases)], timeout=900))


def static_quality(cases: Sequence[tuple[str, int, torch.dtype]]) -> list[dict[str, KernelQuality]]:
    """For each ``(kind, width, dtype)``: ``{"fwd": ..., "bwd": ..., ["reduce": ...]}`` kernel qualities of an sm_90
    compile. Runs the compiler in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces
    ``triton.jit``)."""
    key = tuple((kind, width, str(dtype).removeprefix("torch.")) for kind, width, dtype in cases)
    return [{phase: KernelQuality(**q) for phase, q in entry.items()} for entry in _static_cached(key)]


# ----------------------------------------------------------------------------------------------------------------------
# Static quality of the per-plane kernels (BatchChannelNorm2d, EvoNorm), as their launchers specialize them
# ----------------------------------------------------------------------------------------------------------------------

# (N, C, H, W) of the per-plane audit: a 56×56 stage and a 7×7 one (odd planes), bf16, in both memory formats.
PLANE_SHAPES = ((32, 256, 56, 56), (32, 2048, 7, 7))
PLANE_FORMATS = ("contiguous", "channels_last")


# The group count of the grouped per-plane passes (BCN's channel stage, EvoNorm-S) at the audited shapes.
PLANE_GROUPS = 32


def _plane_launch_calls(x: torch.Tensor, groups: int = PLANE_GROUPS) -> dict[str, Callable[[], object]]:
    """One call of each per-plane launcher (the big passes of BCN and EvoNorm, forward and backward) on ``x``, the
    grouped ones with ``groups`` groups."""
    from normlayers.kernels import batch_channel as B, channel_stats as S, evo_norm as E

    n, c = x.shape[:2]
    per_plane = torch.rand(n, c) + 0.5
    per_channel = torch.rand(c) + 0.5
    calls = {
        "plane_moments fwd": lambda: S.plane_moments_fwd(x),
        "plane_moments bwd": lambda: S.plane_moments_bwd(x, per_plane, per_plane, per_plane, x),
        "plane_affine fwd": lambda: S.plane_affine_fwd(x, per_plane, per_plane, per_plane),
        "plane_affine bwd": lambda: S.plane_affine_bwd(x, x, per_plane, per_plane),
        "bcn eval fwd": lambda: B.batch_channel_eval_fwd(
            x, per_plane, per_plane, per_channel, per_channel, per_channel, per_channel, per_channel[:groups],
            per_channel[:groups], eps=1e-5, bn_eps=1e-5, num_groups=groups, store_coefficients=False),
        "evo s0 fwd": lambda: E.evo_norm_s_fwd(x, per_plane, per_plane, per_channel, per_channel, per_channel,
                                               groups=groups, eps=1e-5, statistic=E.GROUP_VARIANCE,
                                               numerator=E.NUMERATOR_SWISH, store_coefficients=True),
        "evo max-div fwd": lambda: E.evo_plane_fwd(x, E.MODE_MAX_DIV, **{k: per_plane for k in E.MODE_COEFFICIENTS[
            E.MODE_MAX_DIV]}),
        "evo b0 eval fwd": lambda: E.evo_norm_b_eval_fwd(x, per_plane, per_plane, per_channel, per_channel,
                                                         per_channel, per_channel, variant=E.VARIANT_B0, eps=1e-3,
                                                         store_coefficients=False),
    }
    for mode in (E.MODE_SWISH, E.MODE_MAX_DIV):
        names = E.MODE_COEFFICIENTS[mode]
        label = "swish" if mode == E.MODE_SWISH else "max-div"
        calls[f"evo {label} bwd"] = functools.partial(E.evo_plane_bwd, x, x, mode,
                                                      **{k: per_plane for k in names if k != "shift"})
    return calls


# The interpreter counts the sectors of the per-plane passes on the first SECTOR_SAMPLES samples and SECTOR_CHANNELS
# channels of each audited shape: a program's accesses depend on N only through the sample stride, which two samples
# include, and on C only below 64 channels (the widest channel block of a tile) and through the channels per group,
# which the sample keeps (_sector_groups).
SECTOR_SAMPLES = 2
SECTOR_CHANNELS = 64
# The dtypes of the sector-use columns.
SECTOR_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class SectorUse:
    """Sector use of one launch (:func:`sector_use`), per warp instruction and per program call."""

    warp_instruction: float
    program: float


def _sector_sample(shape: tuple[int, ...], memory_format: str, dtype_name: str, values: bool) -> torch.Tensor:
    """The input the sector use is counted on: the first :data:`SECTOR_SAMPLES` samples and :data:`SECTOR_CHANNELS`
    channels of an ``(N, C, H, W)`` input, random (``values``) or left empty (for the compile: only its shape,
    strides and alignment count)."""
    n, c, h, w = shape
    size = (min(n, SECTOR_SAMPLES), min(c, SECTOR_CHANNELS), h, w)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(dtype) if values else torch.empty(size,
                                                                                                        dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x


def _sector_groups(shape: tuple[int, ...]) -> int:
    """Groups of the sector sample's channels that keep the audited shape's channels per group (a group's tile, and
    so its loads, depends on its size: 8 channels at 256, 64 at 2048)."""
    group_size = max(shape[1] // PLANE_GROUPS, 1)
    return max(min(shape[1], SECTOR_CHANNELS) // group_size, 1)


def _plane_sector_launches(shape: list[int], memory_format: str, dtype_name: str) -> dict[str, Callable[[], object]]:
    return _plane_launch_calls(_sector_sample(tuple(shape), memory_format, dtype_name, values=False),
                               _sector_groups(tuple(shape)))


def plane_sector_use(shape: tuple[int, ...], memory_format: str, dtype: torch.dtype) -> dict[str, SectorUse]:
    """Sector use of every per-plane launch of :func:`_plane_launch_calls`, counted in the interpreter on the first
    :data:`SECTOR_SAMPLES` samples and :data:`SECTOR_CHANNELS` channels of an ``(N, C, H, W)`` input of ``dtype``,
    bytes-weighted over the launch: per warp instruction of the sm_90 compile of that very launch
    (:func:`launch_accesses`), and per ``tl.load``/``tl.store`` call of a whole program for comparison."""
    dtype_name = str(dtype).removeprefix("torch.")
    # By module name: run as ``python -m normlayers.bench.audit`` this module is ``__main__``.
    compiled = launch_accesses("normlayers.bench.audit", "_plane_sector_launches",
                               [list(shape), memory_format, dtype_name])
    used = {}
    sample = _sector_sample(shape, memory_format, dtype_name, values=True)
    for label, call in _plane_launch_calls(sample, _sector_groups(shape)).items():
        with count_traffic(compiled[label]) as launches:
            call()
        if not all(t.warp_sectors for t in launches):
            raise RuntimeError(f"{label}: no load or store matched the compiled kernel's")
        used[label] = SectorUse(sector_use(launches, "warp instruction"), sector_use(launches, "program"))
    return used


def _access_worker(source: str, launcher: str, args: list) -> dict[str, list[dict]]:
    import importlib
    import importlib.util

    if source.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(source).stem, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    accesses = {}
    with captured_launches() as captured:
        for label, call in getattr(module, launcher)(*args).items():
            captured.clear()
            call()
            (fn, launch_args, kwargs), = captured
            compiled, _options = _compile_captured(fn, launch_args, kwargs)
            accesses[label] = [asdict(a) for a in warp_sectors.compiled_accesses(compiled.asm["ttgir"],
                                                                                 compiled.asm["llir"])]
    return accesses


def launch_accesses(source: str, launcher: str, args: list) -> dict[str, list[CompiledAccess]]:
    """The global loads and stores (:class:`~normlayers.bench.warp_sectors.CompiledAccess`) of the sm_90 compile of
    each launch of ``launcher(*args)``: a function in module ``source`` (a module name, or a ``.py`` file) returning
    ``{label: call}``, each call launching one ``@triton.jit`` kernel, compiled as :func:`_compile_captured` compiles
    it. ``args`` are JSON values. Runs the compiler in a subprocess without ``TRITON_INTERPRET``; the interpreter
    run that :func:`count_traffic` measures must launch the same kernels with the same specialization (shapes,
    strides, alignment)."""
    code = ("import json, sys; from normlayers.bench.audit import _access_worker; "
            "print(json.dumps(_access_worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))")
    entries = json_from_compile_subprocess(["-c", code, source, launcher, json.dumps(args)], timeout=900)
    return {label: [CompiledAccess.from_json(a) for a in accesses] for label, accesses in entries.items()}


def _compile_captured(fn, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """(compiled kernel, options) of one captured launch, compiled for sm_90 with the specialization Triton's JIT
    gives those arguments (integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers are
    marked so), as a launch on an H100 would be compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__), options


def _compile_launch(fn, args: tuple, kwargs: dict) -> KernelQuality:
    """The :class:`KernelQuality` of one captured launch compiled as :func:`_compile_captured` compiles it."""
    compiled, options = _compile_captured(fn, args, kwargs)
    registers, spills = _ptxas_usage(compiled.asm["ptx"], options.__dict__)
    loads, stores = _sass_widths(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    warps = compiled.metadata.num_warps
    return KernelQuality(fn.__name__, warps, registers, spills, shared, loads, stores,
                         h100_resident_programs(registers, shared, warps), h100_occupancy(registers, shared, warps))


@contextlib.contextmanager
def captured_launches() -> Iterator[list]:
    """Inside the block every ``@triton.jit`` launch is recorded as ``(kernel, args, kwargs)`` instead of run: a
    launcher called on empty tensors yields its launches exactly as specialized, for :func:`_compile_launch`."""
    import triton.runtime.jit as jit

    captured: list = []
    original = jit.JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        captured.append((self, args, kwargs))

    jit.JITFunction.run = capture
    try:
        yield captured
    finally:
        jit.JITFunction.run = original


def launch_specialization(fn, args: tuple, kwargs: dict) -> str:
    """What Triton's JIT compiles a captured launch for on an H100 (the kernel, each argument's specialization, the
    options): two launches with the same value run one binary, so :func:`_compile_launch` need compile it once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, options = binder(*args, **kwargs)
    return f"{fn.__name__} {specialization} {sorted(options.items())}"


def json_from_compile_subprocess(argv: list[str], timeout: float) -> Any:
    """Run ``python *argv`` without ``TRITON_INTERPRET`` (the sm_90 compiles need Triton's real compiler, and a test
    session has the interpreter on) and return the JSON on the last line of its output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the sm_90 compile failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plane_static_worker(cases: list[tuple[list[int], str]], labels: Optional[list[str]] = None) -> list[dict]:
    results = []
    with captured_launches() as captured:
        for shape, memory_format in cases:
            x = torch.empty(shape, dtype=torch.bfloat16)
            if memory_format == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            entry = {}
            for label, call in _plane_launch_calls(x).items():
                if labels is not None and label not in labels:
                    continue
                captured.clear()
                call()
                (fn, args, kwargs), = captured
                entry[label] = asdict(_compile_launch(fn, args, kwargs))
            results.append(entry)
    return results


def plane_static_quality(cases: Sequence[tuple[tuple[int, ...], str]] = tuple(
        (shape, fmt) for shape in PLANE_SHAPES for fmt in PLANE_FORMATS)) -> list[dict[str, KernelQuality]]:
    """For each ``(shape, memory format)`` of a bf16 input: the sm_90 compile of every per-plane launch of BCN and
    EvoNorm (labels of :func:`_plane_launch_calls`), specialized as the launchers would launch it. Runs the compiler
    in a subprocess without ``TRITON_INTERPRET``."""
    code = ("import json, sys; from normlayers.bench.audit import _plane_static_worker; "
            "print(json.dumps(_plane_static_worker(json.loads(sys.argv[1]))))")
    entries = json_from_compile_subprocess(["-c", code, json.dumps([[list(s), f] for s, f in cases])], timeout=1800)
    return [{label: KernelQuality(**q) for label, q in entry.items()} for entry in entries]


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------

SECTIONS = ("launches", "bytes", "static", "planes")
ROW_OPS = ("layer_norm", "rms_norm")


def _widths(values: Sequence[int]) -> str:
    return "/".join(str(v) for v in values) or "-"


def report(sections: Sequence[str] = SECTIONS, widths: Sequence[int] = ROW_WIDTHS,
           progress: Callable[[str], None] = lambda text: None) -> str:
    """The audit as Markdown tables (bf16 throughout)."""
    import datetime

    import triton

    lines = [f"normlayers kernel audit, {datetime.date.today()}: static (sm_90 compile) and Triton-interpreter "
             f"measurements on CPU, not GPU timings. torch {torch.__version__}, triton {triton.__version__}; bf16.", ""]
    if "launches" in sections:
        lines += ["### Launches per layer call", "",
                  "Triton launches + leaf ATen ops that would launch a CUDA kernel (views, allocations and ops on "
                  "empty tensors excluded); host syncs = `aten::item` / `_local_scalar_dense`. Images 2×64×14×14, "
                  "tokens 197×2×768, rows 8×4096.", "",
                  "| layer | train fwd | train bwd | eval fwd | host syncs (fwd/bwd/eval) |", "|---|---|---|---|---|"]
        for case in layer_cases():
            progress(f"launches: {case.label}")
            counts = count_launches(case)
            syncs = "/".join(str(len(counts[p].syncs)) for p in ("train fwd", "train bwd", "eval fwd"))
            lines.append(f"| {case.label} | {counts['train fwd'].launches} | {counts['train bwd'].launches} | "
                         f"{counts['eval fwd'].launches} | {syncs} |")
        lines.append("")
    if "bytes" in sections:
        with_liger = liger_available()
        lines += ["### Row-norm bytes ÷ byte model", "",
                  f"Bytes of mask-true lanes of every load and store, at {REFERENCE_ROWS} rows (from small runs: "
                  f"bytes are affine in rows and programs), the backward on the grid of a "
                  f"{H100_SMS}-SM H100. Unique = distinct bytes per launch, summed over launches; logical = all "
                  f"lanes." + (" Liger-Kernel beside ours (its Triton kernels only)." if with_liger else ""), "",
                  "| op | N | fwd unique | fwd logical | bwd unique | bwd logical | bwd launches | bwd programs |"
                  + (" Liger bwd unique | Liger bwd logical |" if with_liger else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_liger else "")]
        for op_name in ROW_OPS:
            for width in widths:
                progress(f"bytes: {op_name} N={width}")
                fwd, bwd = row_norm_traffic(op_name, width)
                row = (f"| {op_name} | {width} | {fwd.unique:.2f} | {fwd.logical:.2f} | {bwd.unique:.2f} | "
                       f"{bwd.logical:.2f} | {bwd.launches} | {bwd.programs} |")
                if with_liger:
                    lb = liger_row_norm_traffic(op_name, width)
                    row += f" {lb.unique:.2f} | {lb.logical:.2f} |" if lb is not None else " - | - |"
                lines.append(row)
        lines.append("")
    if "static" in sections:
        lines += ["### Static quality (sm_90 compile)", "",
                  "Registers and spill bytes from `ptxas -v`; global access widths (bits) from `cuobjdump -sass` "
                  "(LDG/STG); occupancy = resident warps per H100 SM ÷ 64 from registers, shared memory and warps.",
                  "",
                  "| op | N | kernel | warps | registers | spill bytes | shared | LDG bits | STG bits | programs/SM | "
                  "occupancy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        progress("static: compiling for sm_90")
        cases = [(_KINDS[op][0], width, torch.bfloat16) for op in ROW_OPS for width in widths]
        for (kind, width, _dtype), entry in zip(cases, static_quality(cases)):
            for phase, q in entry.items():
                lines.append(f"| {kind} | {width} | {phase} | {q.num_warps} | {q.registers} | {q.spill_bytes} | "
                             f"{q.shared_bytes} | {_widths(q.load_bits)} | {_widths(q.store_bits)} | "
                             f"{q.programs_per_sm} | {q.occupancy:.2f} |")
        lines.append("")
    if "planes" in sections:
        lines += ["### Per-plane kernels, static quality (sm_90 compile)", "",
                  "BatchChannelNorm2d's and EvoNorm's per-plane passes on bf16 input, each compiled as its launcher "
                  "would launch it (Triton's own specialization of the arguments: strides of 1 become constants, "
                  "multiples of 16 are marked aligned). Registers and spill bytes from `ptxas -v`; global access "
                  "widths (bits) from `cuobjdump -sass`. Sector use: requested bytes ÷ bytes of the 32-byte sectors "
                  "they lie in, bytes-weighted over the launch, counted in the interpreter on "
                  f"{SECTOR_SAMPLES} samples × {SECTOR_CHANNELS} channels, for bf16 and fp32 input. *Per warp "
                  "instruction*: each load/store split into the warp instructions of the sm_90 compile of that "
                  "launch (its TTGIR layout: which lanes of which warp hold which elements; its LLVM IR: the "
                  "vector width), each instruction's active lanes against the sectors they touch, as the GPU "
                  "fetches them (a sector two instructions touch counts twice). *Per program*: each "
                  "`tl.load`/`tl.store` of a whole program against the sectors of its tile (what is fetched only "
                  "if every re-fetch hits a cache).", "",
                  "| N×C×H×W | format | kernel | warps | registers | spill bytes | LDG bits | STG bits | occupancy | "
                  "sector use per warp instr. bf16 | fp32 | per program bf16 | fp32 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        progress("planes: compiling for sm_90")
        cases = [(shape, fmt) for shape in PLANE_SHAPES for fmt in PLANE_FORMATS]
        for (shape, fmt), entry in zip(cases, plane_static_quality(cases)):
            progress(f"planes: sector use {shape} {fmt}")
            used = [plane_sector_use(shape, fmt, dtype) for dtype in SECTOR_DTYPES]
            for label, q in entry.items():
                lines.append(f"| {'×'.join(map(str, shape))} | {fmt} | {label} | {q.num_warps} | {q.registers} | "
                             f"{q.spill_bytes} | {_widths(q.load_bits)} | {_widths(q.store_bits)} | "
                             f"{q.occupancy:.2f} | " + " | ".join(f"{u[label].warp_instruction:.2f}" for u in used)
                             + " | " + " | ".join(f"{u[label].program:.2f}" for u in used) + " |")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m normlayers.bench.audit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit-sections", default=",".join(SECTIONS), metavar="LIST",
                        help=f"which parts of the audit to run, of {','.join(SECTIONS)} (default all)")
    parser.add_argument("--audit-widths", default=",".join(map(str, ROW_WIDTHS)), metavar="LIST",
                        help="row widths of the row-norm bytes and static tables (default %(default)s)")
    parser.add_argument("--audit-output", type=Path, metavar="FILE.md", help="also write the tables here")


def run_audit(args: argparse.Namespace) -> int:
    """Run the audit the parsed arguments ask for and print it; needs the Triton interpreter on a CPU machine."""
    from normlayers.backends import interpreter_enabled

    if "triton" not in sys.modules:  # the interpreter must be chosen before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not interpreter_enabled():
        print("the audit runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    sections = [s for s in args.audit_sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"--audit-sections: unknown {unknown}, expected some of {SECTIONS}", file=sys.stderr)
        return 2
    text = report(sections, [int(w) for w in args.audit_widths.split(",") if w],
                  progress=lambda line: print(f"[audit] {line}", file=sys.stderr, flush=True))
    print(text)
    if args.audit_output is not None:
        args.audit_output.write_text(text + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_audit(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
