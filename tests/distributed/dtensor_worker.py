"""One rank of the 2-process gloo runs of ``test_dtensor.py`` (run as a script: ``dtensor_worker.py RANK WORLD
INIT_FILE OUT``), and the models and data the test shares with it (imported by path).

On a 1-D mesh of the two CPU ranks (``init_device_mesh("cpu", (2,))``), on both backends, it trains for a few SGD steps

* a small pre-norm transformer block (LayerNorm, RMSNorm and CRMSNorm with fused residuals, PowerNorm or UnifiedNorm)
  under tensor + sequence parallelism: ``SequenceParallel`` norms, ``ColwiseParallel``/``RowwiseParallel`` MLP, the
  fused-residual norms on DTensors through ``distribute_module``, the token norm on the gathered sequence;
* the same block under FSDP2 (``fully_shard``) with ``convert_sync``, each rank on its samples;
* a CNN with BatchChannelNorm2d, EvoNorm2dB0, LayerNorm2d, EvoNorm2dS0 and GroupNorm (fused SiLU) under FSDP2 with
  ``convert_sync``, and replicated (``distribute_module``) on an input DTensor sharded on the batch dim (DTensor
  reduces the batch statistics);
* the other layers of ``LAYER_MODELS`` (EvoNorm-S, GroupNorm on NCHW and channels-last shards, RegionNorm,
  weight-standardized convs, SPDBatchNorm, time-major PowerNorm) alone on batch-sharded DTensors;
* the tensor/sequence-parallel block (row norms only) compiled with ``torch.compile(fullgraph=True)``;

and saves per step what the test compares with one process on the whole batch: outputs and input gradients (its part),
full parameter gradients (under FSDP2 averaged over the ranks), parameters after the step and buffers. It also saves
the errors of a norm whose normalized dim is sharded, of LayerNorm2d on sharded channels and of GroupNorm on sharded
channels or height (on the reference path, which runs them, whether the output equals the whole batch's).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

import normlayers

BATCH, SEQ, HIDDEN, STEPS, LR = 2, 4, 8, 3, 0.1
IMAGES, CHANNELS, SIZE = 4, 4, 4
SPD_SIZE = 3
BACKENDS = ("reference", "triton")
TOKEN_NORMS: dict[str, Callable[[], nn.Module]] = {
    "power": lambda: normlayers.PowerNorm(HIDDEN, alpha_fwd=0.7, alpha_bkw=0.6, warmup_iters=2, group_num=2,
                                          batch_first=True),
    "unified": lambda: normlayers.UnifiedNorm(HIDDEN, window_size=2, warmup_iters=1),
    "none": nn.Identity,
}


class Block(nn.Module):
    """``LayerNorm → MLP → (+ input) RMSNorm → token norm → (+ residual) CRMSNorm``, the last two fused."""

    def __init__(self, token_norm: str) -> None:
        super().__init__()
        self.norm_in = normlayers.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)
        self.norm_mid = normlayers.RMSNorm(HIDDEN)
        self.token_norm = TOKEN_NORMS[token_norm]()
        self.norm_out = normlayers.CRMSNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, h = self.norm_mid(self.down(torch.relu(self.up(self.norm_in(x)))), x)
        return self.norm_out(self.token_norm(y), h)[0]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.bcn = normlayers.BatchChannelNorm2d(CHANNELS, num_groups=2)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.evo = normlayers.EvoNorm2dB0(CHANNELS)
        self.ln2d = normlayers.LayerNorm2d(CHANNELS)  # per-pixel statistics over the channels
        self.evo_s = normlayers.EvoNorm2dS0(CHANNELS, groups=2)  # per-sample group statistics
        self.group_norm = normlayers.GroupNorm(2, CHANNELS, act="silu")  # no batch statistics: convert_sync skips it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group_norm(self.evo_s(self.ln2d(self.evo(self.conv2(torch.relu(self.bcn(self.conv1(x))))))))


class EvoNormsS(nn.Module):
    """The EvoNorm-S variants other than S0 (in :class:`ConvNet`), chained: per-sample group statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.evo = nn.Sequential(*(layer(CHANNELS, groups=2) for layer in (
            normlayers.EvoNorm2dS0a, normlayers.EvoNorm2dS1, normlayers.EvoNorm2dS1a, normlayers.EvoNorm2dS2,
            normlayers.EvoNorm2dS2a)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.evo(x)


class RegionNorms(nn.Module):
    """RegionNorm2d with batch statistics, then per sample, then LearnableRegionNorm2d; the hole mask is taken from
    the input (so it is sharded like it)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_batch = normlayers.RegionNorm2d(CHANNELS, eps=0.1)
        self.norm_instance = normlayers.RegionNorm2d(CHANNELS, eps=0.1, stats="instance")
        self.norm_learnable = normlayers.LearnableRegionNorm2d(CHANNELS, threshold=0.5, kernel_size=3, eps=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hole = x[:, :1].detach() > 0.5
        return self.norm_learnable(self.norm_instance(self.norm_batch(x, hole), hole))


class MaskedPowerNorm(nn.Module):
    """Time-major PowerNorm ``(T, B, C)`` with a ``(B, T)`` pad mask taken from the input (so a DTensor mask sharded
    like it: its batch dim is the input's dim 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.token_norm = normlayers.PowerNorm(HIDDEN, alpha_fwd=0.7, alpha_bkw=0.6, warmup_iters=1, group_num=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_norm(x, (x[..., 0] > 1.0).transpose(0, 1))


class GroupNorms(nn.Module):
    """GroupNorm on an NCHW input, then with a fused SiLU on the channels-last copy of its output (the kernels read
    both layouts in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_nchw = normlayers.GroupNorm(2, CHANNELS)
        self.norm_channels_last = normlayers.GroupNorm(2, CHANNELS, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_channels_last(self.norm_nchw(x).contiguous(memory_format=torch.channels_last))


def _weight_standardized() -> nn.Module:
    return nn.Sequential(normlayers.WSConv2d(3, CHANNELS, 3, padding=1),
                         normlayers.ScaledWSConv2d(CHANNELS, CHANNELS, 3, padding=1))


# The layers run on batch-sharded DTensors alone (per-sample statistics, batch statistics and standardized weights).
LAYER_MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": ConvNet, "evo_s": EvoNormsS, "group": GroupNorms, "region": RegionNorms, "ws": _weight_standardized,
    "spd": lambda: normlayers.SPDBatchNorm(SPD_SIZE, momentum=0.3, karcher_steps=2),
    "power_masked": MaskedPowerNorm,
}
BATCH_DIM = {"power_masked": 1}  # the models' batch dims other than 0


def make_model(name: str) -> nn.Module:
    """The model (same initial values in every process), randomized buffers and affine parameters included."""
    torch.manual_seed(3)
    model = LAYER_MODELS[name]() if name in LAYER_MODELS else Block(name)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and ("norm" in key or "bcn" in key or "evo" in key):
                positive = key.endswith(("weight", "running_phi", "running_var", "buffer_x2", "v"))
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if positive else torch.randn(t.shape, generator=gen))
    return model.double().train()


def batches(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every step's global ``(input, output gradient)``, in fp64: UnifiedNorm amplifies the rounding differences
    between the parallel and the one-process sums beyond fp32's tolerance by the third step (~7e-6 relative)."""
    gen = torch.Generator().manual_seed(13)
    images, channels = (IMAGES, CHANNELS, SIZE, SIZE), (IMAGES, 3, SIZE, SIZE)
    shape, out_shape = {"cnn": (channels, images), "ws": (channels, images), "evo_s": (images, images),
                        "group": (images, images), "region": (images, images),
                        "spd": ((IMAGES, SPD_SIZE, SPD_SIZE),) * 2,
                        "power_masked": ((SEQ, BATCH, HIDDEN),) * 2}.get(name, ((BATCH, SEQ, HIDDEN),) * 2)
    data = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5,
             torch.randn(out_shape, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]
    if name == "spd":  # SPD matrices A·Aᵀ + 0.3·I
        data = [(x @ x.mT + 0.3 * torch.eye(SPD_SIZE, dtype=x.dtype), grad) for x, grad in data]
    return data


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model: nn.Module, data: list, forward: Optional[Callable] = None,
          local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, lr: float = LR) -> list[dict]:
    """SGD steps on ``loss = Σ y·grad`` (``local`` picks this process's part of the global tensors); per step the
    output and input gradient (local), full parameter gradients, parameters after the step and buffers."""
    forward = forward or model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    steps = []
    for x, grad in data:
        optimizer.zero_grad()
        leaf = local(x).clone().requires_grad_()
        y = forward(leaf)
        (y * local(grad)).sum().backward()
        result = {"y": y.detach(), "dx": leaf.grad,
                  **{f"grad.{n}": full(p.grad).clone() for n, p in model.named_parameters()}}
        optimizer.step()
        result.update({f"param.{n}": full(p.detach()).clone() for n, p in model.named_parameters()})
        result.update({f"buffer.{n}": full(b).clone() for n, b in model.named_buffers()})
        steps.append(result)
    return steps


def single_process(name: str) -> list[dict]:
    with normlayers.backend("reference"):
        return train(make_model(name), batches(name))


def part(t: torch.Tensor, rank: int, world: int, dim: int) -> torch.Tensor:
    return t.chunk(world, dim)[rank]


def local_output(y, mesh, dim: int) -> torch.Tensor:
    """This rank's part of a DTensor output along ``dim``. Redistributing (not ``full_tensor()`` then slicing) keeps
    the backward right when the output is replicated or partial: each rank's loss term then reaches every rank."""
    from torch.distributed.tensor import Shard

    return y.redistribute(mesh, [Shard(dim)]).to_local()


def tensor_parallel(model: Block, mesh) -> nn.Module:
    """TP/SP plan of :class:`Block`; its input must be a DTensor sharded on the sequence dim."""
    from torch.distributed.tensor import Shard, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    parallelize_module(model, mesh, {
        "norm_in": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        # PowerNorm/UnifiedNorm on the sharded sequence: statistics over the tokens of every rank.
        "token_norm": SequenceParallel(),
    })
    # SequenceParallel hands a module its first input only; the fused-residual norms take two DTensors, so their
    # parameters are replicated by distribute_module.
    distribute_module(model.norm_mid, mesh)
    distribute_module(model.norm_out, mesh)
    return model


def _record_placements(placements: dict, norm: str) -> Callable:
    def hook(module: nn.Module, args: tuple, out) -> None:
        y = out[0] if isinstance(out, tuple) else out  # (y, h) from a fused-residual call
        placements[norm] = str(y.placements)

    return hook


def run_tensor_parallel(name: str, mesh, rank: int, world: int, compiled: bool = False,
                        placements: Optional[dict] = None) -> list[dict]:
    """Train the TP/SP block; ``placements`` (eager only) receives the row norms' output placements."""
    from torch.distributed.tensor import DTensor, Shard

    model = tensor_parallel(make_model(name), mesh)
    if placements is not None:
        for norm in ("norm_in", "norm_mid", "token_norm", "norm_out"):
            getattr(model, norm).register_forward_hook(_record_placements(placements, norm))
    forward = torch.compile(model, fullgraph=True) if compiled else model
    return train(model, batches(name),
                 lambda x: local_output(forward(DTensor.from_local(x, mesh, [Shard(1)], run_check=False)), mesh, 1),
                 local=lambda t: part(t, rank, world, 1))


def run_batch_sharded_dtensor(name: str, mesh, rank: int, world: int) -> list[dict]:
    """The model's parameters and buffers replicated, its input a DTensor sharded on the batch dim."""
    from torch.distributed.tensor import DTensor, Shard, distribute_module

    model = distribute_module(make_model(name), mesh)
    dim = BATCH_DIM.get(name, 0)
    return train(model, batches(name),
                 lambda x: local_output(model(DTensor.from_local(x, mesh, [Shard(dim)], run_check=False)), mesh, dim),
                 local=lambda t: part(t, rank, world, dim))


def group_norm_input_layouts(mesh, rank: int, world: int) -> list[bool]:
    """Whether each GroupNorm of :class:`GroupNorms` gets a channels-last local shard, on a batch-sharded DTensor."""
    from torch.distributed.tensor import DTensor, Shard, distribute_module

    model = distribute_module(make_model("group"), mesh)
    layouts = []
    for norm in (model.norm_nchw, model.norm_channels_last):
        norm.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].to_local().is_contiguous(memory_format=torch.channels_last)))
    model(DTensor.from_local(part(batches("group")[0][0], rank, world, 0), mesh, [Shard(0)], run_check=False))
    return layouts


def run_fsdp(name: str, rank: int, world: int) -> list[dict]:
    from torch.distributed.fsdp import fully_shard

    model = normlayers.convert_sync(make_model(name))
    for module in model.children():
        if any(True for _ in module.parameters()):
            fully_shard(module)
    fully_shard(model)
    # Each rank's loss is its samples' part of the one-process loss and FSDP averages the gradients over the ranks
    # (summing them, set_gradient_divide_factor(1.0), needs PREMUL_SUM, which gloo lacks): the parameter gradients are
    # 1/world of the one-process ones, and the ranks step with world × the learning rate.
    return train(model, batches(name), local=lambda t: part(t, rank, world, 0), lr=LR * world)


def _error_of(call: Callable[[], object]) -> str:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test checks the type and the message
        return f"{type(error).__name__}: {error}"
    return "no error"


def sharded_normalized_dim_error(mesh, rank: int, world: int) -> str:
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    norm = parallelize_module(normlayers.RMSNorm(HIDDEN), mesh, SequenceParallel(sequence_dim=2))
    # fp32: the refusal is before any kernel
    return _error_of(lambda: norm(part(torch.randn(BATCH, SEQ, HIDDEN), rank, world, 2)))


def sharded_error(make_norm: Callable[[], nn.Module], dim: int, mesh, rank: int, world: int) -> str:
    """The error of the norm on an image batch sharded along ``dim``, a dim its statistics span; where it runs (the
    reference path, torch ops that DTensor redistributes) "no error" only if its output equals the norm's on the
    whole batch."""
    from torch.distributed.tensor import DTensor, Shard, distribute_module

    norm = distribute_module(make_norm(), mesh)
    x = torch.randn(IMAGES, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(7))

    def check() -> None:
        y = norm(DTensor.from_local(part(x, rank, world, dim), mesh, [Shard(dim)], run_check=False))
        torch.testing.assert_close(y.full_tensor(), make_norm()(x))

    return _error_of(check)


def local_shards_errors(mesh, rank: int, world: int) -> dict[str, str]:
    """The layers that run DTensors on their local shards, on inputs sharded along a dim their statistics span:
    PowerNorm and UnifiedNorm on the channels, SPDBatchNorm on a matrix dim; and PowerNorm synced over the ranks of a
    replicated input (each would count the same tokens)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

    def error(layer: nn.Module, x: torch.Tensor, dim: int) -> str:
        layer = distribute_module(layer, mesh)
        return _error_of(lambda: layer(DTensor.from_local(part(x, rank, world, dim), mesh, [Shard(dim)],
                                                          run_check=False)))

    tokens = torch.randn(BATCH, SEQ, HIDDEN)
    synced = normlayers.convert_sync(distribute_module(TOKEN_NORMS["power"](), mesh))  # over the world
    replicated = DTensor.from_local(tokens, mesh, [Replicate()], run_check=False)
    return {"synced over replicas": _error_of(lambda: synced(replicated)),
            "PowerNorm": error(TOKEN_NORMS["power"](), tokens, 2),
            "UnifiedNorm": error(TOKEN_NORMS["unified"](), tokens, 2),
            "SPDBatchNorm": error(normlayers.SPDBatchNorm(SPD_SIZE), batches("spd")[0][0].float(), 1)}


def main(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for backend_name in BACKENDS:
        with normlayers.backend(backend_name):
            results[("tp_placements", backend_name)] = placements = {}
            for name in ("power", "unified"):
                results[("tp", backend_name, name)] = run_tensor_parallel(name, mesh, rank, world,
                                                                          placements=placements)
                results[("fsdp", backend_name, name)] = run_fsdp(name, rank, world)
                results[("dtensor_batch", backend_name, name)] = run_batch_sharded_dtensor(name, mesh, rank, world)
            results[("fsdp", backend_name, "cnn")] = run_fsdp("cnn", rank, world)
            for name in LAYER_MODELS:
                results[("dtensor_batch", backend_name, name)] = run_batch_sharded_dtensor(name, mesh, rank, world)
            results[("group_layouts", backend_name)] = group_norm_input_layouts(mesh, rank, world)
            results[("compiled_tp", backend_name, "none")] = run_tensor_parallel("none", mesh, rank, world,
                                                                                compiled=True)
            results[("refused", backend_name)] = sharded_normalized_dim_error(mesh, rank, world)
            # LayerNorm2d (a pixel's statistics span the channels) and GroupNorm (a group's span channels and pixels)
            for case, make_norm, dim in (("refused_channel", lambda: normlayers.LayerNorm2d(CHANNELS), 1),
                                         ("refused_group_channel", lambda: normlayers.GroupNorm(2, CHANNELS), 1),
                                         ("refused_group_spatial", lambda: normlayers.GroupNorm(2, CHANNELS), 2)):
                results[(case, backend_name)] = sharded_error(make_norm, dim, mesh, rank, world)
            results[("refused_local_shards", backend_name)] = local_shards_errors(mesh, rank, world)
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
