"""What the 2-process gloo tests share (loaded by path; ``--import-mode=importlib`` has no package to import from):
loading a worker script as a module, running it as ``world`` rank processes with a file rendezvous, and comparing the
ranks' results with one process on the concatenated batch."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

from normlayers.testing import assert_close


def load_script(path: Path) -> ModuleType:
    """``path`` imported as a module named after the file (registered in ``sys.modules``, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_ranks(worker: Path, tmp_path_factory: pytest.TempPathFactory, world: int, timeout: float = 600) -> list[dict]:
    """Run ``worker RANK WORLD INIT_FILE OUT`` as ``world`` processes; each saves its results to OUT with
    ``torch.save``. Returns them by rank, or fails the test with the end of every worker's log.

    Once per test session, also under pytest-xdist (``-n auto``), where every worker that gets a test of the module
    would run the module's fixture again: the workers share the base temp dir's parent, and the first to take the lock
    runs the ranks while the others wait for its results."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    tmp = shared / f"{worker.stem}_ranks"
    outs = [tmp / f"rank{rank}.pt" for rank in range(world)]
    with open(shared / f"{worker.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = tmp / "done"
        if not done.exists():
            tmp.mkdir(exist_ok=True)
            _spawn(worker, tmp, outs, timeout)
            done.touch()
    return [torch.load(out, weights_only=False) for out in outs]


def _spawn(worker: Path, tmp: Path, outs: list[Path], timeout: float) -> None:
    """One run of ``worker`` as ``len(outs)`` rank processes, rank ``r`` saving to ``outs[r]``."""
    init_file = tmp / "rendezvous"
    init_file.unlink(missing_ok=True)
    world = len(outs)
    processes = [subprocess.Popen([sys.executable, str(worker), str(rank), str(world), str(init_file), str(out)],
                                  env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank, out in enumerate(outs)]
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"the distributed workers did not finish in {timeout} s")
    if any(p.returncode != 0 for p in processes):
        pytest.fail("a worker failed:\n" + "\n".join(log[-3000:] for log in logs))


def check_against_single_process(per_rank: list[list[dict]], expected: list[dict],
                                 local_part: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Per step: ``y``/``dx`` of each rank equal its part of the single-process tensor (``local_part(t, rank)``),
    ``grad.*`` summed over ranks equal the single-process gradient (what DDP's all-reduce averages), and every other
    entry (buffers) is equal on every rank."""
    for step, truth in enumerate(expected):
        for key, value in truth.items():
            if key in ("y", "dx"):
                for rank, steps in enumerate(per_rank):
                    assert_close(steps[step][key], local_part(value, rank), msg=f"step {step} {key}")
            elif key.startswith("grad."):
                assert_close(sum(steps[step][key] for steps in per_rank), value, msg=f"step {step} {key}")
            elif value.is_floating_point():
                for steps in per_rank:
                    assert_close(steps[step][key], value, msg=f"step {step} {key}")
            else:
                for steps in per_rank:
                    assert torch.equal(steps[step][key], value), f"step {step} {key}"
