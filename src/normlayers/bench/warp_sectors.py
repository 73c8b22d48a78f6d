"""Which lanes of a compiled Triton kernel share a global memory instruction, read from the compiler's own output, so
that an access the interpreter runs can be split into the warp instructions a GPU would issue for it.

A compiled kernel's final TTGIR gives every ``tt.load`` / ``tt.store`` the distributed layout of its pointer tensor:
which element each register of each lane of each warp holds (``#ttg.blocked``, or a ``#ttg.slice`` of one, which is
what Triton 3.6 and 3.9 give the kernels audited here; another layout is refused). Its LLVM IR gives the width of the
PTX instructions each of those ops became (``ld.global.v4.b32`` = 128 bits), which the layout alone does not fix (the
compiler narrows a vector where it cannot prove alignment). A warp instruction is then one vector slot (``vector``
consecutive registers of a thread) of all 32 lanes of one warp; :func:`warp_sectors` counts, per such instruction, the
bytes its active lanes request and the 32-byte sectors they touch.

Ops are named by their *site*: the ``(file name, line)`` of the ``tl.load`` / ``tl.store`` call, then of each call it
was inlined through, innermost first, as both the TTGIR locations and the interpreter's Python frames give it
(:func:`interpreter_site`). Columns are compared only among the compiled ops (:func:`issued_per_call`): Triton
versions number them differently from Python (3.6 from the dedented function, 3.9 from the file).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

SECTOR_BYTES = 32
WARP_LANES = 32

Site = tuple[tuple[str, int], ...]
Columns = tuple[int, ...]
Bases = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class CompiledAccess:
    """One global ``tt.load`` / ``tt.store`` of a compiled kernel.

    ``registers``, ``lanes`` and ``warps`` are the bases of its layout as a linear layout (Triton's own
    representation): the tile coordinates held by register ``r`` of lane ``l`` of warp ``w`` are the XOR of the bases
    of the bits set in ``r``, ``l`` and ``w``. A zero basis means copies (lanes or warps holding the same element).
    ``vector``: the elements of a thread one PTX instruction moves."""

    kind: str  # "load" or "store"
    site: Site
    columns: Columns  # the compiler's column of each frame of ``site``: tells two calls on one line apart
    shape: tuple[int, ...]
    element_bytes: int
    vector: int
    registers: Bases
    lanes: Bases
    warps: Bases

    @classmethod
    def from_json(cls, entry: dict) -> "CompiledAccess":
        return cls(entry["kind"], tuple(tuple(frame) for frame in entry["site"]), tuple(entry["columns"]),
                   tuple(entry["shape"]), entry["element_bytes"], entry["vector"],
                   *(tuple(tuple(b) for b in entry[name]) for name in ("registers", "lanes", "warps")))

    @cached_property
    def instructions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(elements, issued)``, each ``(instructions, 32·vector)``: the flat tile index each lane's vector element
        of each warp instruction holds, and whether the lane moves it. Loads: every lane, copies included (each lane
        needs the value). Stores: only the first holder of each element, in (warp, lane, register) order, as the
        compiler predicates off the copies."""
        coords = _coordinates(self.registers, self.lanes, self.warps, len(self.shape))  # (W, L, R, rank)
        flat = (np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), self.shape) if self.shape
                else np.zeros(coords.shape[:3], dtype=np.int64))
        if np.unique(flat).size != int(np.prod(self.shape)):
            raise ValueError(f"{self.site}: the layout does not cover the {self.shape} tile")
        warps, lanes, registers = flat.shape
        if registers % self.vector:
            raise ValueError(f"{self.site}: {registers} registers per thread are not {self.vector}-element vectors")

        def by_instruction(per_register: np.ndarray) -> np.ndarray:
            slots = per_register.reshape(warps, lanes, registers // self.vector, self.vector)
            return slots.transpose(0, 2, 1, 3).reshape(-1, lanes * self.vector)

        issued = np.ones(flat.shape, dtype=bool)
        if self.kind == "store":
            issued = np.zeros(flat.size, dtype=bool)
            issued[np.unique(flat.reshape(-1), return_index=True)[1]] = True
        return by_instruction(flat), by_instruction(issued)


def _coordinates(registers: Bases, lanes: Bases, warps: Bases, rank: int) -> np.ndarray:
    """Tile coordinates ``(W, L, R, rank)`` of every (warp, lane, register) of a linear layout."""

    def span(bases: Bases) -> np.ndarray:
        values = np.zeros((1, rank), dtype=np.int64)
        for basis in bases:
            values = np.concatenate([values, values ^ np.asarray(basis, dtype=np.int64)])
        return values

    return span(warps)[:, None, None, :] ^ span(lanes)[None, :, None, :] ^ span(registers)[None, None, :, :]


def warp_sectors(access: CompiledAccess, addresses: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """``(requested bytes, sectors)`` of one program's run of ``access``, summed over its warp instructions: per
    instruction, the distinct bytes its active (issued and mask-true) lanes move and the distinct 32-byte sectors
    they lie in. Instructions with no active lane move nothing and count nothing. ``addresses``/``mask``: the
    interpreter's pointer tensor (byte addresses) and mask, of the access's tile shape."""
    if tuple(addresses.shape) != access.shape:
        raise ValueError(f"{access.site}: the interpreter's tile {tuple(addresses.shape)} is not the compiled "
                         f"{access.shape}")
    elements, issued = access.instructions
    active = np.broadcast_to(mask, addresses.shape).reshape(-1)[elements] & issued
    lanes = addresses.reshape(-1)[elements].astype(np.int64)
    requested = _distinct_per_row(lanes, active).sum() * access.element_bytes
    return int(requested), int(_distinct_per_row(lanes // SECTOR_BYTES, active).sum())


def _distinct_per_row(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    ordered = np.sort(np.where(valid, values, -1), axis=1)
    return (ordered[:, 0] >= 0) + ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the compiler's output
# ----------------------------------------------------------------------------------------------------------------------


def compiled_accesses(ttgir: str, llir: str) -> list[CompiledAccess]:
    """The global loads and stores of one compiled kernel (``compiled.asm["ttgir"]``, ``compiled.asm["llir"]``), one
    entry per TTGIR op: where the compiler made several ops of one call (a load rematerialized in a second layout for
    another user), each is an entry, with its own layout and width.

    The width of an op's instructions is read from the LLVM IR at its site; where copies of one call share a site
    and their widths differ, each copy gets the widest width its layout's contiguous registers can hold, and the
    instruction count of every width must then match the LLVM IR's (registers ÷ vector per copy), else this
    raises. Registers that hold copies (a tensor narrower than the layout's ``sizePerThread``) are issued by some
    Triton versions (3.6) and not by others (3.9): they count as instructions where the LLVM IR's count says so."""
    layouts = dict(re.findall(r"^#([\w.]+) = (#ttg\.\w+<.*>)\s*$", ttgir, flags=re.M))
    locations = _LocationParser(dict(re.findall(r"^#(loc\d*) = loc\((.*)\)\s*$", ttgir, flags=re.M)))
    num_warps = int(re.search(r'"ttg\.num-warps" = (\d+)', ttgir).group(1))
    ops: dict[tuple[str, tuple], list[tuple]] = {}
    for line in ttgir.splitlines():
        op = re.match(r"\s*(?:%\S+ = )?(tt\.load|tt\.store|ttg\.async_copy_global_to_local)\b", line)
        if op is None:
            continue
        if op.group(1) == "ttg.async_copy_global_to_local":
            raise NotImplementedError("an asynchronous copy (cp.async) is not modelled: " + line.strip())
        at = line.rindex(" loc(")
        frames = locations.site(line[at + 5:-1])
        pointer = re.search(r" : (tensor<(.*?)x!tt\.ptr<(\w+)>, (.*)>|!tt\.ptr<(\w+)>)", line[:at])
        if pointer.group(2) is not None:
            shape = tuple(int(d) for d in pointer.group(2).split("x"))
            element, layout = pointer.group(3), pointer.group(4)
        else:  # a scalar pointer: every lane of every warp moves the one element
            shape, element, layout = (), pointer.group(5), None
        bases = (_linear_bases(layout, shape, layouts) if layout is not None
                 else ((), ((),) * (WARP_LANES.bit_length() - 1), ((),) * (num_warps.bit_length() - 1)))
        ops.setdefault((op.group(1).removeprefix("tt."), frames), []).append((shape, _element_bits(element), bases))
    widths = _instruction_bits(llir)
    accesses = []
    for (kind, frames), copies in ops.items():
        found = widths.get((kind, frames), {})
        implied = []
        for issues_copies in (False, True):
            ops_here = [(shape, bits, (registers if issues_copies else tuple(b for b in registers if any(b)),
                                       lanes, warps)) for shape, bits, (registers, lanes, warps) in copies]
            vectors = []
            for shape, bits, bases in ops_here:
                fits = [w for w in found if w // bits <= _contiguous_registers(bases[0], len(shape))] or [0]
                vectors.append(max(max(fits) // bits, 1))
            counted: dict[int, int] = {}
            for (shape, bits, bases), vector in zip(ops_here, vectors):
                counted[vector * bits] = counted.get(vector * bits, 0) + (1 << len(bases[0])) // vector
            if counted == found:
                break
            implied.append(counted)
        else:
            raise ValueError(f"{kind} at {frames}: the LLVM IR holds {found} instructions of each width (bits), the "
                             f"layouts imply {implied[0]} (or {implied[1]} with the registers that hold copies)")
        site, columns = tuple(f[:2] for f in frames), tuple(f[2] for f in frames)
        accesses += [CompiledAccess(kind, site, columns, shape, bits // 8, vector, *bases)
                     for (shape, bits, bases), vector in zip(ops_here, vectors)]
    return accesses


def _contiguous_registers(registers: Bases, rank: int) -> int:
    """How many of a thread's first registers hold consecutive elements along one dim (a vector's most)."""
    run = 1
    for basis in registers:
        if sorted(basis) != [0] * (rank - 1) + [run] or (run > 1 and basis.index(run) != registers[0].index(1)):
            break
        run *= 2
    return run


def issued_per_call(accesses: Sequence[CompiledAccess]) -> dict[tuple[str, Site], list[CompiledAccess]]:
    """The compiled ops one interpreted ``tl.load`` / ``tl.store`` call at each (kind, site) stands for.

    The interpreter knows a call's lines, not its column, so: ops at one site that share their columns are one call
    the compiler copied, and each interpreted call issues all of them; ops at one site with different columns are
    several calls on one line, and each interpreted call issues one of them, which must then all compile alike
    (shape, layout, width), else this raises (the audit cannot tell which call runs: put them on separate lines)."""
    by_site: dict[tuple[str, Site], dict[Columns, list[CompiledAccess]]] = {}
    for access in accesses:
        by_site.setdefault((access.kind, access.site), {}).setdefault(access.columns, []).append(access)
    issued = {}
    for key, calls in by_site.items():
        if len(calls) == 1:
            issued[key] = next(iter(calls.values()))
            continue
        ops = [op for copies in calls.values() for op in copies]
        if any(len(copies) > 1 for copies in calls.values()) or len({_layout_of(op) for op in ops}) > 1:
            raise ValueError(f"{len(calls)} {key[0]} calls at {key[1]} compile differently; the audit cannot tell "
                             "which one the interpreter runs (put them on separate lines)")
        issued[key] = ops[:1]
    return issued


def _layout_of(access: CompiledAccess) -> tuple:
    return access.shape, access.element_bytes, access.vector, access.registers, access.lanes, access.warps


def _element_bits(name: str) -> int:
    bits = re.search(r"\d+", name)
    if bits is None or name == "i1":
        raise ValueError(f"unexpected element type {name}")
    return int(bits.group(0))


def _linear_bases(layout: str, shape: tuple[int, ...], aliases: dict[str, str]) -> tuple[Bases, Bases, Bases]:
    """(registers, lanes, warps) bases of ``layout`` over a tensor of ``shape``, as Triton's ``toLinearLayout``
    builds them: a blocked layout's registers along its ``sizePerThread`` (fastest dim first), then its lanes and
    warps, each along ``order``; where the tensor is larger than the layout's tile the extra elements are more
    registers, where it is smaller the bases past it are zero (copies). A slice drops its dim from its parent's
    layout over the shape with that dim of size 1 (its registers along that dim become copies)."""
    while layout.startswith("#") and layout[1:] in aliases:
        layout = aliases[layout[1:]]
    body = layout[layout.index("<") + 1:layout.rindex(">")]
    if layout.startswith("#ttg.blocked<"):
        fields = {k: [int(v) for v in re.findall(r"\d+", vals)]
                  for k, vals in re.findall(r"(\w+) = \[([\d, ]*)\]", body)}
        return _blocked_bases(fields["sizePerThread"], fields["threadsPerWarp"], fields["warpsPerCTA"],
                              fields["order"], shape)
    if layout.startswith("#ttg.slice<"):
        dim = int(re.search(r"dim = (\d+)", body).group(1))
        parent = body[body.index("parent = ") + len("parent = "):].rstrip("}").strip()
        registers, lanes, warps = _linear_bases(parent, shape[:dim] + (1,) + shape[dim:], aliases)

        def drop(bases: Bases) -> Bases:
            return tuple(b[:dim] + b[dim + 1:] for b in bases)

        return drop(registers), drop(lanes), drop(warps)
    raise NotImplementedError(f"layout {layout} is not modelled")


def _blocked_bases(size_per_thread: list[int], threads: list[int], warps: list[int], order: list[int],
                   shape: tuple[int, ...]) -> tuple[Bases, Bases, Bases]:
    rank = len(shape)

    def unit(dim: int, step: int) -> tuple[int, ...]:
        return tuple(step if d == dim else 0 for d in range(rank))

    def along(counts: list[int], start: list[int]) -> list[tuple[int, ...]]:
        bases = []
        for dim in order:
            for bit in range(counts[dim].bit_length() - 1):
                step = start[dim] << bit
                bases.append(unit(dim, step) if step < shape[dim] else (0,) * rank)
        return bases

    ones = [1] * rank
    registers = along(size_per_thread, ones)
    lanes = along(threads, size_per_thread)
    tile = [s * t for s, t in zip(size_per_thread, threads)]
    warp_bases = along(warps, tile)
    tile = [t * w for t, w in zip(tile, warps)]
    registers += along([max(s // t, 1) for s, t in zip(shape, tile)], tile)
    return tuple(registers), tuple(lanes), tuple(warp_bases)


class _LocationParser:
    """Frames ``(file name, line, column)``, innermost first, of MLIR locations: ``"file":line:col``,
    ``callsite(callee at caller)``, ``"name"(loc)``, ``#alias``, ``fused[...]`` (its first part), ``unknown``."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self._aliases = aliases
        self._resolved: dict[str, tuple] = {}

    def site(self, text: str) -> tuple:
        site, _ = self._parse(text.strip(), 0)
        return site

    def _parse(self, text: str, at: int) -> tuple[tuple, int]:
        if text.startswith("#loc", at):
            name = re.match(r"#(loc\d*)", text[at:]).group(1)
            if name not in self._resolved:
                self._resolved[name] = self.site(self._aliases[name])
            return self._resolved[name], at + len(name) + 1
        if text.startswith("callsite(", at):
            callee, at = self._parse(text, at + len("callsite("))
            if not text.startswith(" at ", at):
                raise ValueError(f"unexpected location {text!r}")
            caller, at = self._parse(text, at + len(" at "))
            return callee + caller, at + 1  # ")"
        if text.startswith("fused", at):
            start = text.index("[", at)
            first, at = self._parse(text, start + 1)
            depth = 1
            while depth:
                depth += {"[": 1, "]": -1}.get(text[at], 0)
                at += 1
            return first, at
        if text.startswith("unknown", at):
            return (), at + len("unknown")
        if text.startswith('"', at):
            end = text.index('"', at + 1)
            name = text[at + 1:end]
            at = end + 1
            position = re.match(r":(\d+):(\d+)(?: to (?:\d+:)?\d+)?", text[at:])
            if position is not None:
                return ((Path(name).name, int(position.group(1)), int(position.group(2))),), at + position.end()
            if text.startswith("(", at):
                inner, at = self._parse(text, at + 1)
                return inner, at + 1
            return (), at
        raise ValueError(f"unexpected location {text[at:]!r}")


def _instruction_bits(llir: str) -> dict[tuple[str, tuple], dict[int, int]]:
    """Per (kind, frames with columns): how many global load / store instructions of each width (bits) the LLVM IR
    holds there (inline PTX ``ld.global`` / ``st.global``, or plain LLVM loads and stores of address space 1)."""
    files = dict(re.findall(r'^!(\d+) = !DIFile\(filename: "([^"]*)"', llir, flags=re.M))
    scopes = dict(re.findall(r"^!(\d+) = (?:distinct )?!DI(?:Subprogram|LexicalBlockFile|LexicalBlock)\(.*?"
                             r"\bfile: !(\d+)", llir, flags=re.M))
    where = {m.group(1): (int(m.group(2)), int(m.group(3) or 0), m.group(4), m.group(5)) for m in re.finditer(
        r"^!(\d+) = (?:distinct )?!DILocation\(line: (\d+)(?:, column: (\d+))?, scope: !(\d+)"
        r"(?:, inlinedAt: !(\d+))?", llir, flags=re.M)}

    def frames(node: Optional[str]) -> tuple:
        found = []
        while node is not None:
            line, column, scope, node = where[node]
            found.append((Path(files[scopes[scope]]).name, line, column))
        return tuple(found)

    counts: dict[tuple[str, tuple], dict[int, int]] = {}
    for line in llir.splitlines():
        dbg = re.search(r"!dbg !(\d+)", line)
        if dbg is None:
            continue
        widths = [("load" if kind == "ld" else "store", int(vector or 1) * int(size)) for kind, vector, size in
                  re.findall(r"(?<![A-Za-z.])(ld|st)\.global(?:\.[A-Za-z_0-9:]+?)*?(?:\.v(\d))?\.[bfsu](\d+)\b", line)]
        plain = re.search(r"= load (<(\d+) x )?[a-z]+?(\d+)>?, ptr addrspace\(1\)|\bstore (<(\d+) x )?[a-z]+?(\d+)>? "
                          r"%\S+, ptr addrspace\(1\)", line)
        if plain is not None:
            loaded = plain.group(3) is not None
            vector, size = (plain.group(2), plain.group(3)) if loaded else (plain.group(5), plain.group(6))
            widths.append(("load" if loaded else "store", int(vector or 1) * int(size)))
        for kind, width in widths:
            at = counts.setdefault((kind, frames(dbg.group(1))), {})
            at[width] = at.get(width, 0) + 1
    return counts


CallLines = tuple[tuple[str, int, int], ...]


def interpreter_site(kernel: str, kernel_file: str, skip: Sequence[str]) -> CallLines:
    """Where the interpreted ``tl.load`` / ``tl.store`` now running is: per Python frame from its call out to the
    frame of the launched kernel (``kernel`` defined in ``kernel_file``), leaving out the frames of the files and
    folders in ``skip`` (Triton's own, the audit's), the file name and the first and last line of the call that frame
    is in (a call may span lines, and Triton versions place its op on different ones: 3.9 on the first, 3.6 on the
    line of the last argument it visited)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(tuple(skip)):
            first, last = _call_lines(code, frame.f_lasti)
            frames.append((Path(code.co_filename).name, first, last))
            if code.co_name == kernel and code.co_filename == kernel_file:
                return tuple(frames)
        frame = frame.f_back
    raise RuntimeError(f"no frame of kernel {kernel} on the stack")


@lru_cache(maxsize=None)
def _positions(code) -> list:
    return list(code.co_positions())


def _call_lines(code, offset: int) -> tuple[int, int]:
    first, last, _, _ = _positions(code)[offset // 2]
    return first, last if last is not None else first


class SiteIndex:
    """The compiled ops (:func:`issued_per_call`) each interpreted call stands for, found by its
    :func:`interpreter_site`: the ops whose site has, frame by frame, the same file and a line within the call's
    lines. Where several sites fit, the one on the first lines of the calls is taken; several fitting and none of
    them on the first lines is an error."""

    def __init__(self, accesses: Sequence[CompiledAccess]) -> None:
        self._issued = issued_per_call(accesses)
        self._found: dict[tuple[str, CallLines], list[CompiledAccess]] = {}

    def __bool__(self) -> bool:
        return bool(self._issued)

    def issued(self, kind: str, call: CallLines) -> list[CompiledAccess]:
        """The ops ``call`` issues; none where the compiled kernel has no such op (a load it removed as dead)."""
        if (kind, call) not in self._found:
            fits = [site for k, site in self._issued if k == kind and len(site) == len(call)
                    and all(f == cf and first <= line <= last for (f, line), (cf, first, last) in zip(site, call))]
            exact = [site for site in fits if all(line == first for (_, line), (_, first, _) in zip(site, call))]
            if len(fits) > 1 and len(exact) != 1:
                raise ValueError(f"the {kind} at {call} fits compiled ops at {fits}: the audit cannot tell which")
            self._found[(kind, call)] = self._issued[(kind, (exact or fits)[0])] if fits else []
        return self._found[(kind, call)]
