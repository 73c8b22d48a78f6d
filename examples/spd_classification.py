"""SPDNet-style classification of synthetic ill-conditioned covariance matrices, with and without SPDBatchNorm.

The model is SPDNet (Huang & Van Gool, 2017) with a batch norm between its layers:

    BiMap (X ↦ WᵀXW, W with orthonormal columns) → ReEig (eigenvalues floored at 1e-4) → SPDBatchNorm
    → LogEig (matrix log) → upper triangle → Linear

The data are a small synthetic stand-in for the paper's data sets (which need downloads): K classes with means
``Σ_k = Q_k diag(e^u) Q_kᵀ``, ``u ~ U(0, log κ)`` (condition number up to κ), samples ``Σ_k^{1/2} Wishart(ν, I)/ν
Σ_k^{1/2}``, and a nuisance congruence ``X ← A X Aᵀ``, ``A = expm(0.3 S)``, shared by all samples of one of several
"sessions" (as EEG recordings differ between sessions); training batches are drawn within one session each.

Compared (each with the same seed and data):

* ``SPDNet``: no batch norm;
* ``GBW-BN``: ``SPDBatchNorm`` with a learnable metric M (the paper's layer, θ = 1);
* ``GBW-BN θ=0.5``: the power-deformed metric;
* ``BW-BN``: ``learn_metric=False`` — the plain Bures–Wasserstein metric, M = I fixed.

Every parameter, the SPD ones included, is trained with plain ``torch.optim.Adam`` (W and M are ``exp`` of a
symmetric matrix; BiMap's W is kept orthonormal by ``torch.nn.utils.parametrizations.orthogonal``). After training
the batch norms' running statistics are recomputed with the final metric M (see ``recalibrate``).

Printed per model: test accuracy in eval mode (running statistics), test accuracy with each test session normalized
by its own batch statistics (the batch norms' only way to remove a session's nuisance), and train accuracy in eval
mode. Matrix sizes are small, so one intra-op thread (``OMP_NUM_THREADS=1``) is usually fastest on a CPU.

    python examples/spd_classification.py            # a few minutes on a CPU
    python examples/spd_classification.py --quick    # seconds: a smoke run, accuracies meaningless
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Optional

import torch
from torch import Tensor, nn

import normlayers
from normlayers.reference import spd_linalg


class BiMap(nn.Module):
    """``X ↦ WᵀXW`` with ``W`` (n_in × n_out) of orthonormal columns."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.utils.parametrizations.orthogonal(nn.Linear(n_in, n_out, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        w = self.linear.weight  # (n_out, n_in), orthonormal rows
        return spd_linalg.sym(w @ x @ w.T)


class ReEig(nn.Module):
    def __init__(self, threshold: float = 1e-4) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: Tensor) -> Tensor:
        return spd_linalg.rectify(x, self.threshold)


class LogEigFlatten(nn.Module):
    """Matrix log, then the upper triangle (off-diagonal entries × √2, so the map is an isometry)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(n, n)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.register_buffer("scale", torch.where(rows == cols, 1.0, math.sqrt(2.0)))

    def forward(self, x: Tensor) -> Tensor:
        return spd_linalg.logm(x)[:, self.rows, self.cols] * self.scale.to(x.dtype)


def spdnet(n_in: int, hidden: tuple[int, int], classes: int, norm: Optional[nn.Module]) -> nn.Module:
    n_mid, n_out = hidden
    layers: list[nn.Module] = [BiMap(n_in, n_mid), ReEig(), BiMap(n_mid, n_out), ReEig()]
    if norm is not None:
        layers.append(norm)
    layers += [LogEigFlatten(n_out), nn.Linear(n_out * (n_out + 1) // 2, classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q


def make_dataset(n: int, classes: int, sessions: int, per_class_session: int, kappa: float, separation: float,
                 dof: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(matrices (N, n, n) fp64, labels (N,), sessions (N,)).

    A shared base ``Σ₀ = Q diag(e^u) Qᵀ`` of condition up to ``kappa``; class ``k``'s mean is
    ``Σ₀^{1/2} expm(separation·S_k) Σ₀^{1/2}`` with ``S_k`` symmetric of unit Frobenius norm, so classes differ by a
    small, ill-conditioned change.
    """
    q = random_orthogonal(n, generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * math.log(kappa)
    base_root = q @ torch.diag((u / 2).exp()) @ q.T
    means = []
    for _ in range(classes):
        direction = torch.randn(n, n, generator=generator, dtype=torch.float64)
        direction = (direction + direction.T) / 2
        means.append(base_root @ torch.linalg.matrix_exp(separation * direction / direction.norm()) @ base_root)
    xs, ys, ss = [], [], []
    for session in range(sessions):
        s = torch.randn(n, n, generator=generator, dtype=torch.float64)
        nuisance = torch.linalg.matrix_exp(0.3 * (s + s.T) / 2)
        for label, mean in enumerate(means):
            a = torch.randn(per_class_session, n, dof, generator=generator, dtype=torch.float64)
            root = torch.linalg.cholesky(mean)
            x = nuisance @ root @ (a @ a.mT / dof) @ root.T @ nuisance.T
            xs.append(x / x.diagonal(dim1=-2, dim2=-1).sum(-1).mean())
            ys.append(torch.full((per_class_session,), label))
            ss.append(torch.full((per_class_session,), session))
    return torch.cat(xs), torch.cat(ys), torch.cat(ss)


def session_batches(sessions: Tensor, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches, each inside one session (so batch statistics see one nuisance)."""
    batches = []
    for session in sessions.unique():
        idx = (sessions == session).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        batches += [b for b in idx.split(batch_size) if len(b) > 1]
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in order]


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def accuracy(model: nn.Module, x: Tensor, y: Tensor, sessions: Tensor, session_statistics: bool = False) -> float:
    """Accuracy, one session at a time. ``session_statistics=False``: eval mode, the batch norms use their running
    statistics. ``True``: the batch norms normalize each session with its own batch statistics (all of its samples
    in one batch; the running buffers are left alone), as cross-session EEG pipelines do."""
    norms = [m for m in model.modules() if isinstance(m, normlayers.SPDBatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.train(session_statistics)
        m.momentum = 0.0
    correct = 0
    with torch.no_grad():
        for session in sessions.unique():
            mask = sessions == session
            correct += (model(x[mask]).argmax(-1) == y[mask]).sum().item()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return correct / len(y)


@torch.no_grad()
def recalibrate(model: nn.Module, x: Tensor, sessions: Tensor, batch_size: int, generator: torch.Generator) -> None:
    """Recompute the running statistics of every SPDBatchNorm with the final parameters: the running mean is stored
    in the coordinates of the metric M at update time, which moved during training (docs/spd_batch_norm.md). A
    cumulative average (momentum 1/k for the k-th batch) along the BW geodesic over one pass of the training batches."""
    norms = [m for m in model.modules() if isinstance(m, normlayers.SPDBatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    model.train()
    for k, batch in enumerate(session_batches(sessions, batch_size, generator), start=1):
        for m in norms:
            m.momentum = 1.0 / k
        model(x[batch])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def train(name: str, norm: Optional[nn.Module], data: dict, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(args.seed)
    n_in, classes = data["train"][0].shape[-1], int(data["train"][1].max()) + 1
    model = spdnet(n_in, (args.hidden, args.out), classes, norm).to(torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    x, y, s = data["train"]
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for batch in session_batches(s, args.batch_size, generator):
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    recalibrate(model, x, s, args.batch_size, generator)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, *data["test"])
    adapted = accuracy(model, *data["test"], session_statistics=True)
    print(f"{name:<17} test accuracy {100 * test_accuracy:5.1f}%  with per-session statistics {100 * adapted:5.1f}%  "
          f"train accuracy {100 * accuracy(model, *data['train']):5.1f}%"
          + ("" if args.quick else f"  ({seconds:.1f} s)"), flush=True)  # --quick: noise, not printed
    return test_accuracy, seconds


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run (tiny data, one epoch)")
    parser.add_argument("--n", type=int, default=20, help="input matrix size")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--out", type=int, default=12)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--per-class-session", type=int, default=40)
    parser.add_argument("--kappa", type=float, default=1e3, help="condition number of the class means")
    parser.add_argument("--separation", type=float, default=2.0, help="distance of the class means from the base")
    parser.add_argument("--dof", type=int, default=30, help="Wishart degrees of freedom (noise: lower is noisier)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        print("--quick: a smoke run of a few training steps; its results say nothing about the norms")
        args.n, args.hidden, args.out, args.sessions, args.per_class_session, args.epochs = 8, 6, 4, 2, 8, 1
        args.classes, args.batch_size = 3, 12

    generator = torch.Generator().manual_seed(args.seed)
    x, y, s = make_dataset(args.n, args.classes, args.sessions, 2 * args.per_class_session, args.kappa,
                           args.separation, args.dof, generator)
    # Half of each (session, class) block for training, half for testing.
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask.view(-1, 2 * args.per_class_session)[:, args.per_class_session:] = True
    data = {"train": (x[~test_mask], y[~test_mask], s[~test_mask]), "test": (x[test_mask], y[test_mask], s[test_mask])}
    print(f"{len(y)} SPD matrices {args.n}x{args.n}, {args.classes} classes, {args.sessions} sessions, class-mean "
          f"condition up to {args.kappa:g}; SPDNet {args.n}->{args.hidden}->{args.out}, {args.epochs} epochs")

    out = args.out
    models = {
        "SPDNet": None,
        "GBW-BN": normlayers.SPDBatchNorm(out, dtype=torch.float64),
        "GBW-BN theta=0.5": normlayers.SPDBatchNorm(out, theta=0.5, dtype=torch.float64),
        "BW-BN (M = I)": normlayers.SPDBatchNorm(out, learn_metric=False, dtype=torch.float64),
    }
    return {name: train(name, norm, data, args)[0] for name, norm in models.items()}


if __name__ == "__main__":
    main()
