"""One rank of the 4-process gloo run of ``test_mesh_2d.py`` (run as a script: ``mesh2d_worker.py RANK WORLD
INIT_FILE OUT``): the pre-norm block of ``dtensor_worker.py`` (LayerNorm, RMSNorm and CRMSNorm with fused residuals)
on a 2-D mesh, FSDP2 (``fully_shard``) over ``dp`` × tensor/sequence parallelism over ``tp``, as torchtitan composes
them, on both backends; per SGD step what the test compares with one process on the whole batch.
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


def run_fsdp_tp(mesh, rank: int) -> list[dict]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    tp_mesh = mesh["tp"]
    model = one_dim.tensor_parallel(one_dim.make_model("none"), tp_mesh)
    fully_shard(model, mesh=mesh["dp"])
    # FSDP averages the gradients over dp (each dp rank's loss is its samples' part): the ranks step with dp × lr.
    return one_dim.train(
        model, one_dim.batches("none"),
        lambda x: one_dim.local_output(model(DTensor.from_local(x, tp_mesh, [Shard(1)], run_check=False)), tp_mesh, 1),
        local=lambda t: local_part(t, rank), lr=one_dim.LR * MESH[0])


def main(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
    results = {}
    for backend_name in one_dim.BACKENDS:
        with normlayers.backend(backend_name):
            results[backend_name] = run_fsdp_tp(mesh, rank)
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
