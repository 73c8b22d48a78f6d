"""One rank of the 4-process gloo run of ``test_mesh_2d.py`` (run as a script: ``mesh2d_worker.py RANK WORLD
INIT_FILE OUT``): the pre-norm block of ``dtensor_worker.py`` (LayerNorm, RMSNorm and CRMSNorm with fused residuals,
PowerNorm with ``convert_sync``) on a 2-D mesh, FSDP2 (``fully_shard``) over ``dp`` × tensor/sequence parallelism over
``tp``, as torchtitan composes them, on both backends; per SGD step what the test compares with one process on the
whole batch. Also the error of PowerNorm synced over ``dp`` only.
"""

from __future__ import annotations

import sys

import dtensor_worker as one_dim  # the block, data and training loop of the 1-D runs (this script's folder)
import torch
import torch.distributed as dist

import normlayers

MESH = (2, 2)  # (dp, tp)


def coordinates(rank: int) -> tuple[int, int]:
    """``(dp, tp)`` index of ``rank`` in the row-major ``(dp, tp)`` mesh."""
    return divmod(rank, MESH[1])


def local_part(t: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's samples (its dp index) and, of those, its sequence part (its tp index)."""
    dp, tp = coordinates(rank)
    return one_dim.part(one_dim.part(t, dp, MESH[0], 0), tp, MESH[1], 1)


def fsdp_tp_model(mesh, process_group=None) -> torch.nn.Module:
    """The PowerNorm block, tensor/sequence parallel over ``tp`` and FSDP2 over ``dp``; PowerNorm syncs its statistics
    over ``process_group`` (default: the world, i.e. every rank's tokens)."""
    from torch.distributed.fsdp import fully_shard

    model = one_dim.tensor_parallel(normlayers.convert_sync(one_dim.make_model("power"), process_group), mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def forward(model: torch.nn.Module, tp_mesh, x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    return one_dim.local_output(model(DTensor.from_local(x, tp_mesh, [Shard(1)], run_check=False)), tp_mesh, 1)


def run_fsdp_tp(mesh, rank: int) -> list[dict]:
    model = fsdp_tp_model(mesh)
    # FSDP averages the gradients over dp (each dp rank's loss is its samples' part): the ranks step with dp × lr.
    return one_dim.train(model, one_dim.batches("power"), lambda x: forward(model, mesh["tp"], x),
                         local=lambda t: local_part(t, rank), lr=one_dim.LR * MESH[0])


def sync_over_dp_only_error(mesh, rank: int) -> str:
    """PowerNorm synced over ``dp`` alone, its input sharded over ``tp``: refused (the group misses shards)."""
    model = fsdp_tp_model(mesh, mesh["dp"].get_group())
    x = local_part(one_dim.batches("power")[0][0], rank)
    return one_dim._error_of(lambda: forward(model, mesh["tp"], x))


def main(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
    results = {}
    for backend_name in one_dim.BACKENDS:
        with normlayers.backend(backend_name):
            results[backend_name] = run_fsdp_tp(mesh, rank)
            results[("refused", backend_name)] = sync_over_dp_only_error(mesh, rank)
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
