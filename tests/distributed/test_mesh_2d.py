"""A 2-D device mesh, FSDP2 over ``dp`` × tensor/sequence parallelism over ``tp`` (4 gloo processes on CPU), against
one process on the whole batch: the pre-norm block (LayerNorm, fused-residual RMSNorm and CRMSNorm, PowerNorm with
``convert_sync``: statistics over the tokens of all four ranks), both backends (the Triton kernels through the
interpreter and the custom ops' sharding rules), three SGD steps.

Each rank holds its dp index's samples and, of those, its tp index's part of the sequence; every step must equal the
single-process run: outputs and input gradients part by part, the full parameter gradients (averaged over dp by FSDP),
parameters after the step and buffers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gloo_ranks as ranks
from normlayers.testing import assert_close

_WORKER = Path(__file__).with_name("mesh2d_worker.py")
worker = ranks.load_script(_WORKER)
one_dim = worker.one_dim


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return ranks.run_ranks(_WORKER, tmp_path_factory, worker.MESH[0] * worker.MESH[1])


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", one_dim.BACKENDS)
def test_fsdp_by_tensor_parallel_equals_one_process(rank_results, backend_name):
    truth_steps = one_dim.single_process("power")
    for rank, results in enumerate(rank_results):
        for step, (got, truth) in enumerate(zip(results[backend_name], truth_steps, strict=True)):
            assert got.keys() == truth.keys()
            for key, value in truth.items():
                if key in ("y", "dx"):
                    expected = worker.local_part(value, rank)
                elif key.startswith("grad."):
                    expected = value / worker.MESH[0]  # FSDP averages the dp ranks' gradients
                else:
                    expected = value
                if value.is_floating_point():
                    assert_close(got[key], expected, msg=f"rank {rank} step {step} {key}")
                else:
                    assert torch.equal(got[key], expected), f"rank {rank} step {step} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", one_dim.BACKENDS)
def test_sync_group_missing_the_tensor_parallel_shards_is_refused(rank_results, backend_name):
    for results in rank_results:
        message = results[("refused", backend_name)]
        assert message.startswith("ValueError: PowerNorm: sync_stats=True") and "every rank" in message, message
