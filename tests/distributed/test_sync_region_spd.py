"""Synced statistics (``sync_stats=True``) of RegionNorm2d, LearnableRegionNorm2d and SPDBatchNorm across 2 gloo
processes against one process on the whole batch.

One spawn of two ranks (``region_spd_worker.py``) runs every case: RN-B and RN-L with ``stats="batch"`` on both
backends (the Triton path through the interpreter), uneven batches, an empty rank, a hole region empty on one rank
and on every rank, the plain and the effective epsilon (whose global counts a local run would get wrong), and
``stats="instance"`` (sync a no-op); SPDBatchNorm pooled and per channel, two Karcher steps, both dispersions, an
empty rank; a ``torch.compile(fullgraph=True)`` run of each layer; and eval calls on one rank (no collective). Each
must equal the single-process run on the concatenated batch: outputs and input gradients row by row, parameter
gradients summed over ranks (what DDP's all-reduce averages), running buffers on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gloo_ranks as ranks
import normlayers
from normlayers.testing import assert_close

WORLD = 2
_WORKER = Path(__file__).with_name("region_spd_worker.py")


worker = ranks.load_script(_WORKER)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return ranks.run_ranks(_WORKER, tmp_path_factory, WORLD)


def _single_process(name: str) -> list[dict]:
    module, inputs, grads = worker.make_case(name)
    with normlayers.backend("reference"):
        return worker.run_steps(module, inputs, grads)


def _check(per_rank: list[list[dict]], expected: list[dict], splits: tuple[int, ...]) -> None:
    ranks.check_against_single_process(per_rank, expected, lambda t, rank: t[worker.rows_of(rank, splits)])


_RUNS = [(backend_name, name) for name, case in worker.CASES.items()
         for backend_name in (worker.BACKENDS if case.kind != "spd" else worker.BACKENDS[:1])]


@pytest.mark.parametrize(("backend_name", "name"), _RUNS)
def test_synced_ranks_equal_one_process_on_the_whole_batch(rank_results, backend_name, name):
    per_rank = [results[(backend_name, name)] for results in rank_results]
    _check(per_rank, _single_process(name), worker.CASES[name].splits)


@pytest.mark.parametrize("name", worker.COMPILED)
def test_compiled_synced_layer(rank_results, name):
    per_rank = [results[("compiled", name)] for results in rank_results]
    _check(per_rank, _single_process(name), worker.CASES[name].splits)


@pytest.mark.parametrize(("backend_name", "name"), [run for run in _RUNS if run[1] in worker.EVALUATED])
def test_synced_layer_in_eval_runs_without_collectives(rank_results, backend_name, name):
    # Only rank 0 ran the eval forward (a collective there would have hung the worker). RegionNorm then uses its
    # rows' own statistics; SPDBatchNorm the running buffers, which training on the synced ranks made the whole
    # batch's.
    module, inputs, grads = worker.make_case(name)
    with normlayers.backend("reference"):
        worker.run_steps(module, inputs, grads)
        expected = worker.evaluate(module, worker.local_rows(0, name, inputs, grads)[0][0])
    assert_close(rank_results[0][(backend_name, "eval", name)], expected)


def test_local_statistics_would_differ(rank_results):
    # The comparison can fail: without the exchange, rank 0's outputs (3 of 4 rows; eps = 0.1, so also the effective
    # epsilon's counts) and the SPD buffers differ from the whole batch's.
    for name in ("rn_b", "rn_l", "spd"):
        module, inputs, grads = worker.make_case(name)
        local = worker.run_steps(module, *worker.local_rows(0, name, inputs, grads))
        whole = _single_process(name)
        key = "buffer.running_mean" if name == "spd" else "y"
        rows = slice(None) if name == "spd" else worker.rows_of(0, worker.CASES[name].splits)
        # A tolerance 100x wider than fp32's makes this "must differ" check stricter, not looser: local and global
        # statistics must differ by far more than rounding.
        assert not torch.allclose(local[0][key], whole[0][key][rows], rtol=1e-3, atol=1e-3), name


@pytest.mark.parametrize("name", ["rn_b", "rn_l", "spd"])
def test_sync_stats_without_a_process_group_is_local(name):
    # SyncBatchNorm's rule: with torch.distributed not initialized, sync_stats=True computes local statistics.
    module, inputs, grads = worker.make_case(name)
    synced = normlayers.convert_sync(worker.make_case(name)[0])
    assert synced.sync_stats and "sync_stats=True" in repr(synced)
    for a, b in zip(worker.run_steps(module, inputs, grads), worker.run_steps(synced, inputs, grads)):
        for key in a:
            assert torch.equal(a[key], b[key]), key
