"""Tensor/sequence parallelism (DTensor) and FSDP2 with normlayers on 2 gloo processes, against one process on the
whole batch.

One spawn of two ranks (``dtensor_worker.py``, a 1-D CPU mesh) runs on both backends — the Triton kernels through the
interpreter, reaching the custom ops' sharding rules (``normlayers.ops.sharding``) — a pre-norm block (LayerNorm,
RMSNorm and CRMSNorm with fused residuals, PowerNorm or UnifiedNorm) under ``SequenceParallel`` +
``ColwiseParallel``/``RowwiseParallel`` and under ``fully_shard`` with ``convert_sync``, a CNN with BatchChannelNorm2d,
EvoNorm2dB0 and GroupNorm under ``fully_shard`` with ``convert_sync`` and replicated on a batch-sharded DTensor input,
the other image and token layers (GroupNorm on NCHW and channels-last shards among them) on batch-sharded DTensors,
and the tensor-parallel block compiled with ``fullgraph=True``; three SGD steps each. Every step must equal the
single-process run: outputs and input gradients part by part, the full parameter gradients (averaged over the ranks
under FSDP2), the parameters after the step and every buffer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gloo_ranks as ranks
import normlayers
from normlayers.testing import assert_close

WORLD = 2
_WORKER = Path(__file__).with_name("dtensor_worker.py")

worker = ranks.load_script(_WORKER)
_SEQUENCE_PARALLEL_NORMS = ("norm_in", "norm_mid", "token_norm", "norm_out")
# (parallelism, model) -> the dim along which each rank holds its part of the inputs and outputs
_CASES = {("tp", "power"): 1, ("tp", "unified"): 1, ("compiled_tp", "none"): 1,
          ("dtensor_batch", "power"): 0, ("dtensor_batch", "unified"): 0, ("fsdp", "power"): 0,
          ("fsdp", "unified"): 0, ("fsdp", "cnn"): 0,
          **{("dtensor_batch", name): worker.BATCH_DIM.get(name, 0) for name in worker.LAYER_MODELS}}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return ranks.run_ranks(_WORKER, tmp_path_factory, WORLD)


@pytest.fixture(scope="module")
def single_process() -> dict[str, list[dict]]:
    return {name: worker.single_process(name) for name in {name for _, name in _CASES}}


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
@pytest.mark.parametrize("parallelism, name", list(_CASES))
def test_parallel_training_equals_one_process(rank_results, single_process, parallelism, name, backend_name):
    dim = _CASES[(parallelism, name)]
    for rank, results in enumerate(rank_results):
        steps = results[(parallelism, backend_name, name)]
        for step, (got, truth) in enumerate(zip(steps, single_process[name], strict=True)):
            assert got.keys() == truth.keys()
            for key, value in truth.items():
                expected = worker.part(value, rank, WORLD, dim) if key in ("y", "dx") else value
                if parallelism == "fsdp" and key.startswith("grad."):
                    expected = value / WORLD  # FSDP averages the ranks' gradients; they step with world × lr
                if value.is_floating_point():
                    assert_close(got[key], expected, msg=f"rank {rank} step {step} {key}")
                else:
                    assert torch.equal(got[key], expected), f"rank {rank} step {step} {key}"


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
@pytest.mark.parametrize(("case", "op", "dim"), [
    ("refused", "row_norm_fwd", 1),  # RMSNorm, normalized (hidden) dim sharded
    ("refused_channel", "channel_norm_fwd", 1),  # LayerNorm2d, channels sharded
    ("refused_group_channel", "group_norm_fwd", 1),  # GroupNorm, channels sharded
    ("refused_group_spatial", "group_norm_fwd", 2)])  # GroupNorm, height sharded
def test_sharded_normalized_dim_is_refused_naming_op_and_dim(rank_results, backend_name, case, op, dim):
    for results in rank_results:
        message = results[(case, backend_name)]
        if backend_name == "triton":
            assert f"normlayers::{op}" in message and f"sharded along dim {dim}" in message, message
        else:
            # The reference path is torch's own ops: DTensor gathers the normalized dim and gives the right values
            # (the image norms' cases check them against the whole batch).
            assert message == "no error", message


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
def test_local_shard_layers_refuse_a_sharded_statistic_dim_naming_layer_and_placement(rank_results, backend_name):
    # PowerNorm/UnifiedNorm on sharded channels, SPDBatchNorm on a sharded matrix dim; and a sync group whose ranks
    # hold the same (replicated) tokens.
    for results in rank_results:
        errors = dict(results[("refused_local_shards", backend_name)])
        message = errors.pop("synced over replicas")
        assert message.startswith("ValueError: PowerNorm: sync_stats=True") and "count them twice" in message, message
        for layer, message in errors.items():
            dim = 1 if layer == "SPDBatchNorm" else 2
            assert message.startswith(f"ValueError: {layer}: ") and f"Shard(dim={dim})" in message, message
            assert f"Replicate() dim {dim}" in message, message


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
def test_sequence_stays_sharded_through_the_norms(rank_results, backend_name):
    # No gather inside the norms: their outputs keep the input's sequence sharding (the kernel path's rules keep the
    # strided row sharding of the flattened (batch, seq) rows; the token norms run on the local shards).
    for results in rank_results:
        assert results[("tp_placements", backend_name)] == {norm: "(Shard(dim=1),)"
                                                            for norm in _SEQUENCE_PARALLEL_NORMS}


@pytest.mark.parametrize("backend_name", worker.BACKENDS)
def test_group_norm_shards_keep_their_memory_format(rank_results, backend_name):
    # The GroupNorm case runs both layouts the kernels read: NCHW, then channels-last local shards.
    for results in rank_results:
        assert results[("group_layouts", backend_name)] == [False, True]


def test_convert_sync_leaves_group_norm_as_it_is():
    # GroupNorm has no batch statistics: the FSDP2 CNN's convert_sync turns on BatchChannelNorm2d's and EvoNorm-B's
    # syncing only, and leaves the GroupNorm module, its configuration and its parameters untouched.
    model = worker.make_model("cnn")
    group_norm = model.group_norm
    before = {key: value.clone() for key, value in group_norm.state_dict().items()}
    assert not (model.bcn.sync_stats or model.evo.sync_stats)
    normlayers.convert_sync(model)
    assert model.bcn.sync_stats and model.evo.sync_stats
    assert model.group_norm is group_norm and type(group_norm) is normlayers.GroupNorm
    assert not hasattr(group_norm, "sync_stats") and (group_norm.num_groups, group_norm.act) == (2, "silu")
    assert all(torch.equal(value, before[key]) for key, value in group_norm.state_dict().items())


def test_cases_reach_the_paths_they_name(single_process):
    # Local statistics would differ from the whole batch's (else a layer that never synced would pass), and the
    # steps change the parameters and the running buffers.
    power_steps = single_process["power"]
    module = worker.make_model("power")
    local = worker.train(module, worker.batches("power"), local=lambda t: worker.part(t, 0, WORLD, 0))
    assert not torch.allclose(local[-1]["buffer.token_norm.ema_gz"], power_steps[-1]["buffer.token_norm.ema_gz"])
    for name, key in (("region", "y"), ("spd", "buffer.running_mean"), ("unified", "buffer.token_norm.running_var")):
        # The batch-statistic layers run on DTensors through the layers' local-shard path: one shard's statistics
        # are not the batch's.
        local = worker.train(worker.make_model(name), worker.batches(name), local=lambda t: worker.part(t, 0, WORLD, 0))
        expected = single_process[name][0][key]
        expected = worker.part(expected, 0, WORLD, 0) if key == "y" else expected
        assert not torch.allclose(local[0][key], expected), name
    cnn = single_process["cnn"]
    assert not torch.allclose(cnn[-1]["buffer.bcn.bn.running_mean"], cnn[0]["buffer.bcn.bn.running_mean"])
    assert not torch.allclose(cnn[-1]["param.evo.weight"], cnn[0]["param.evo.weight"])


_REGISTRATION_PROBE = """
import sys
import torch
import normlayers
assert "torch.distributed.tensor" not in sys.modules, "import normlayers imported DTensor"
from torch.distributed.tensor import DTensor
strategies = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
ops = [getattr(torch.ops.normlayers, name).default for name in dir(torch.ops.normlayers) if not name.startswith("_")
       and isinstance(getattr(torch.ops.normlayers, name), torch._ops.OpOverloadPacket)]
print(sorted(str(op) for op in ops if op not in strategies))
"""


def test_every_custom_op_gets_a_rule_once_dtensor_is_imported():
    # A fresh interpreter: `import normlayers` must not import torch.distributed.tensor (slow), and importing it
    # afterwards must register a rule for every normlayers op (the import hook), however many ops there are.
    result = subprocess.run([sys.executable, "-c", _REGISTRATION_PROBE], capture_output=True, text=True,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"ops without a sharding rule: {result.stdout}"
