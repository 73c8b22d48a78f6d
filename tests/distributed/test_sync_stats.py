"""Synced batch statistics (``sync_stats=True``) across 2 gloo processes against one process on the whole batch.

One spawn of two ranks (``sync_worker.py``) runs every case — BatchChannelNorm2d (BatchNorm and EstBN stages) and
EvoNorm B0/B1/B2, on both backends, with uneven batches and an empty rank, over two steps; a torch.compile'd synced
layer; and a few DDP training steps of a small CNN. Each must equal the single-process run on the concatenated batch:
outputs and input gradients row by row, parameter gradients summed over ranks (what DDP's all-reduce averages),
running buffers on every rank, and, for DDP, the trained parameters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gloo_ranks as ranks
import normlayers
from normlayers.testing import assert_close

WORLD = 2
_WORKER = Path(__file__).with_name("sync_worker.py")


worker = ranks.load_script(_WORKER)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return ranks.run_ranks(_WORKER, tmp_path_factory, WORLD)


def _single_process(name: str) -> list[dict]:
    module, xs, grads = worker.make_case(name)
    with normlayers.backend("reference"):
        return worker.run_steps(module, xs, grads)


def _check_against_single_process(per_rank: list[list[dict]], expected: list[dict], splits: tuple[int, ...]) -> None:
    ranks.check_against_single_process(per_rank, expected, lambda t, rank: t[worker.rows_of(rank, splits)])


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
@pytest.mark.parametrize("name", list(worker.CASES))
def test_synced_ranks_equal_one_process_on_the_whole_batch(rank_results, name, backend_name):
    per_rank = [results[(backend_name, name)] for results in rank_results]
    _check_against_single_process(per_rank, _single_process(name), worker.CASES[name][1])


def test_compiled_synced_layer(rank_results):
    per_rank = [results[("compiled", "bcn")] for results in rank_results]
    _check_against_single_process(per_rank, _single_process("bcn"), worker.CASES["bcn"][1])


def test_ddp_training_with_synced_norms_equals_one_process(rank_results):
    model = worker.make_cnn()
    images, labels = worker.cnn_data()
    worker.train_cnn(model, images, labels, 1 / sum(worker.DDP_SPLITS))
    for results in rank_results:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                assert_close(results["ddp_state"][key], value, msg=key)
            else:
                assert torch.equal(results["ddp_state"][key], value), key


def test_sync_stats_without_a_process_group_is_local():
    # SyncBatchNorm's rule: with torch.distributed not initialized, sync_stats=True computes local statistics.
    module, xs, grads = worker.make_case("bcn")
    synced = normlayers.convert_sync(worker.make_case("bcn")[0])
    assert synced.sync_stats and "sync_stats=True" in repr(synced)
    for a, b in zip(worker.run_steps(module, xs, grads), worker.run_steps(synced, xs, grads)):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_convert_sync_keeps_state_dict_keys_and_parameters():
    model = worker.make_cnn()
    keys, params = list(model.state_dict()), list(model.parameters())
    assert normlayers.convert_sync(model, process_group=None) is model
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))
    flags = [m.sync_stats for m in model.modules() if hasattr(m, "sync_stats")]
    assert flags == [True, True]  # the BatchChannelNorm2d and the EvoNorm2dB0
