"""PowerNorm and UnifiedNorm with ``sync_stats=True`` across 2 gloo processes against one process on the whole batch.

One spawn of two ranks (``token_norms_worker.py``) runs every case on both backends — padded sequences split unevenly,
a rank with no samples, a rank with only padding, six steps across PowerNorm's warm-up and UnifiedNorm's windows, the
outlier filtration, UnifiedNorm's factor ``r`` from step 1000 — a torch.compile'd synced layer of each on both
backends, an explicit process group, and DDP training of a small token model. Each must equal the single-process run
on the concatenated batch: outputs and input gradients sample by sample, parameter gradients summed over ranks (what
DDP's all-reduce averages), and every buffer on every rank, the approximate backward's ``ema_gz``/``buffer_gz``
included (synced by default, docs/distributed.md); for DDP, the trained parameters and buffers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gloo_ranks as ranks
import normlayers
from normlayers.testing import assert_close

WORLD = 2
_WORKER = Path(__file__).with_name("token_norms_worker.py")


worker = ranks.load_script(_WORKER)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return ranks.run_ranks(_WORKER, tmp_path_factory, WORLD)


def _single_process(name: str) -> list[dict]:
    module, batches = worker.make_case(name)
    with normlayers.backend("reference"):
        return worker.run_steps(name, module, batches)


def _check_against_single_process(name: str, per_rank: list[list[dict]], expected: list[dict]) -> None:
    case = worker.CASES[name]

    def local_part(t: torch.Tensor, rank: int) -> torch.Tensor:
        samples = worker.rows_of(rank, case.splits)
        return t[:, samples] if case.batch_dim == 1 else t[samples]

    ranks.check_against_single_process(per_rank, expected, local_part)


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
@pytest.mark.parametrize("name", list(worker.CASES))
def test_synced_ranks_equal_one_process_on_the_whole_batch(rank_results, name, backend_name):
    per_rank = [results[(backend_name, name)] for results in rank_results]
    _check_against_single_process(name, per_rank, _single_process(name))


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
@pytest.mark.parametrize("name", worker.COMPILED_CASES)
def test_compiled_synced_layer(rank_results, name, backend_name):
    per_rank = [results[("compiled", backend_name, name)] for results in rank_results]
    _check_against_single_process(name, per_rank, _single_process(name))


@pytest.mark.parametrize("name", worker.COMPILED_CASES)
def test_explicit_process_group(rank_results, name):
    per_rank = [results[("group", name)] for results in rank_results]
    _check_against_single_process(name, per_rank, _single_process(name))


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
def test_ddp_training_with_synced_token_norms_equals_one_process(rank_results, backend_name):
    # One process trains with the mean loss over the global batch (loss scale 1/G). Under DDP each rank's loss is
    # world/G · its local sum, so DDP's average of the parameter gradients is the one-process gradient, while the
    # gradient reaching the layers is `world` times larger: the gradient statistics (ema_gz, buffer_gz, from 0) are
    # `world` times the one-process ones and everything else is equal — the approximate backwards use them relative
    # to that same gradient (docs/distributed.md, "Loss scale").
    model = worker.TokenModel()
    worker.train_tokens(model, worker.token_data(), 1 / sum(worker.DDP_SPLITS))
    for results in rank_results:
        for key, value in model.state_dict().items():
            got = results[("ddp", backend_name)][key]
            if key.endswith(("ema_gz", "buffer_gz")):
                assert value.abs().max() > 0, key
                assert_close(got, value * WORLD, msg=key)
            elif value.is_floating_point():
                assert_close(got, value, msg=key)
            else:
                assert torch.equal(got, value), key


def test_cases_reach_the_paths_they_name():
    # The comparisons above are only as strong as the cases: the outlier case must filter a step, and the ranks'
    # local statistics must differ from the global ones (else a layer that never synced would pass).
    final = _single_process("unified_outlier_all_pad_rank")[-1]
    assert final["buffer.skip_counter"].item() >= 1
    for name in ("power", "unified"):
        module, batches = worker.make_case(name)
        local = worker.run_steps(name, module, worker.local_batches(name, batches, rank=0))
        assert not torch.allclose(local[-1]["buffer.ema_gz"], _single_process(name)[-1]["buffer.ema_gz"])
