"""Cost of consolidation and of the penalty against model size, snapshots, K and past experiences.

Measured in one process on MNIST images with a 2-hidden-layer MLP of each width:

- ``step``: one training step (forward, backward, Adam) on a minibatch of 128, alone
  and with each penalty: EWC as :class:`vsfcl.ewc.EWCPlugin` stores it (one combined
  quadratic), EWC as Avalanche 0.6.0's ``EWCPlugin`` stores it (one per past
  experience) and the flatness penalty (``K`` rows per past experience, or merged
  into ``K`` rows over all past experiences with ``max_directions=K``). The step
  variants are interleaved, and the median over ``--steps`` steps is kept.
- ``consolidation``: the work after an experience. For EWC, the Fisher pass over
  ``--fisher-samples`` images; for flatness, PCA of ``n_snapshots`` planted snapshots
  (a random walk) and the stiffness from loss profiles (``flatness``) or from the
  variances alone (``variance``).
- ``storage``: floats kept per past experience by each penalty.

Example (the sizes of the tables in BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --widths 100 400 1000 2000 --json benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin
from avalanche.training.utils import ParamData
from torch import nn
from torch.nn import functional as F

from vsfcl.data.mnist import load_mnist
from vsfcl.ewc import EWCPlugin, fisher_diagonal
from vsfcl.models import build_mlp
from vsfcl.plugin import FlatnessPlugin
from vsfcl.regularizer import SharpSubspace


def mnist_batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mnist = load_mnist(None)
    x = mnist.train_images[:n].reshape(n, -1).float() / 255.0
    y = mnist.train_labels[:n].long()
    return x, y, torch.zeros_like(y)


def random_subspaces(
    n_params: int, n_directions: int, n_experiences: int, anchor: torch.Tensor
) -> list[SharpSubspace]:
    subspaces = []
    for experience in range(n_experiences):
        directions, _ = torch.linalg.qr(torch.randn(n_params, n_directions))
        subspaces.append(
            SharpSubspace(
                anchor + 0.01 * torch.randn(n_params),
                directions.T.contiguous(),
                torch.rand(n_directions),
                experience,
            )
        )
    return subspaces


class NoPenalty:
    """Stand-in plugin of the naive step."""

    def before_backward(self, strategy: Any) -> None:
        pass

    def after_backward(self, strategy: Any) -> None:
        pass


def penalties(model: nn.Module, n_experiences: int, n_directions: int) -> dict[str, Any]:
    """Return each penalty's plugin, filled with ``n_experiences`` past experiences."""
    named = dict(model.named_parameters())
    ours = EWCPlugin(1.0)
    avalanche = AvalancheEWCPlugin(1.0)
    for experience in range(n_experiences):
        importances = {n: torch.rand_like(p) for n, p in named.items()}
        anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in named.items()}
        ours.penalty.add(importances, anchor)
        avalanche.importances[experience] = {
            n: ParamData(n, init_tensor=v) for n, v in importances.items()
        }
        avalanche.saved_params[experience] = {
            n: ParamData(n, init_tensor=v) for n, v in anchor.items()
        }
    flatness = FlatnessPlugin(n_directions=n_directions, n_snapshots=n_directions + 1)
    merged = FlatnessPlugin(
        n_directions=n_directions, n_snapshots=n_directions + 1, max_directions=n_directions
    )
    weights = torch.cat([p.detach().flatten() for p in named.values()])
    for subspace in random_subspaces(weights.numel(), n_directions, n_experiences, weights):
        flatness.penalty.add(subspace)
        merged.penalty.add(subspace)
    return {
        "naive": NoPenalty(),
        "ewc_vsfcl": ours,
        "ewc_avalanche": avalanche,
        "flatness": flatness,
        "flatness_merged": merged,
    }


def time_steps(
    model: nn.Module,
    plugins: dict[str, Any],
    batch: tuple,
    n_experiences: int,
    steps: int,
) -> dict[str, float]:
    """Median seconds per training step with each penalty's hooks, interleaved."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y, _ = batch
    times: dict[str, list[float]] = {name: [] for name in plugins}
    strategy = SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        clock=SimpleNamespace(train_exp_counter=n_experiences),
    )
    for step in range(steps + 1):
        for name, plugin in plugins.items():
            start = time.perf_counter()
            strategy.loss = F.cross_entropy(model(x), y)
            plugin.before_backward(strategy)
            optimizer.zero_grad()
            strategy.loss.backward()
            plugin.after_backward(strategy)
            optimizer.step()
            if step > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_flatness_consolidation(
    model: nn.Module,
    batch: tuple,
    stiffness: str,
    n_snapshots: int,
    n_directions: int,
    trajectory: str = "training",
) -> float:
    """Seconds of the flatness plugin's work after an experience.

    With ``trajectory="training"`` the snapshots are planted (a random walk), so this
    is PCA plus stiffness. With ``"sgd_probe"`` the plugin first runs its SGD probe on
    minibatches of 128 from ``batch``.
    """
    plugin = FlatnessPlugin(
        n_directions=n_directions,
        n_snapshots=n_snapshots,
        stiffness=stiffness,
        profile_samples=256,
        trajectory=trajectory,
    )
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    if trajectory == "training":
        steps = 1e-3 * torch.randn(n_snapshots, weights.numel()).cumsum(dim=0)
        plugin._snapshots = list(weights + steps)
    x, y, t = batch
    strategy = SimpleNamespace(
        model=model,
        _criterion=nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
        dataloader=[
            [x[i : i + 128], y[i : i + 128], t[i : i + 128]] for i in range(0, len(y), 128)
        ],
        experience=SimpleNamespace(current_experience=0),
    )
    plugin.after_training_exp(strategy)
    return plugin.consolidations[-1].seconds


def time_fisher(model: nn.Module, batch: tuple, estimate: str, n_samples: int) -> float:
    x, y, t = batch
    batches = iter(
        [(x[i : i + 128], y[i : i + 128], t[i : i + 128]) for i in range(0, n_samples, 128)]
    )
    start = time.perf_counter()
    fisher_diagonal(model, batches, estimate, torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 400, 1000, 2000])
    parser.add_argument("--past-experiences", type=int, nargs="+", default=[1, 4, 9])
    parser.add_argument(
        "--directions", type=int, nargs="+", default=[5, 20, 40], help="K values at width 400"
    )
    parser.add_argument(
        "--snapshots",
        type=int,
        nargs="+",
        default=[21, 41, 81],
        help="n_snapshots values at width 400, K=20",
    )
    parser.add_argument(
        "--experience-samples",
        type=int,
        nargs="+",
        default=[10800, 54000],
        help="experience sizes at which consolidation is timed at width 400 (split MNIST "
        "and permuted MNIST after the validation split)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--fisher-samples", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = mnist_batch(max(args.fisher_samples, 256, *args.experience_samples))
    step_batch = (batch[0][:128], batch[1][:128], batch[2][:128])
    records: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        records.append(record)
        print(
            json.dumps(
                {k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()}
            ),
            flush=True,
        )

    # Model size: one past experience, K = 20, 41 snapshots.
    for width in args.widths:
        model = build_mlp(hidden_sizes=[width, width], n_classes=10)
        n_params = sum(p.numel() for p in model.parameters())
        steps = time_steps(model, penalties(model, 1, 20), step_batch, 1, args.steps)
        record = {
            "study": "width",
            "width": width,
            "n_params": n_params,
            **{f"step_{k}": v for k, v in steps.items()},
        }
        for estimate in ("batched", "empirical"):
            record[f"fisher_{estimate}_seconds"] = time_fisher(
                model, batch, estimate, args.fisher_samples
            )
        for stiffness in ("variance", "flatness"):
            record[f"flatness_{stiffness}_seconds"] = time_flatness_consolidation(
                model, batch, stiffness, 41, 20
            )
        record["storage_floats_ewc_per_experience_avalanche"] = 2 * n_params
        record["storage_floats_ewc_vsfcl_total"] = 2 * n_params
        record["storage_floats_flatness_per_experience"] = 21 * n_params
        report(record)

    # Past experiences, K and snapshots at width 400.
    model = build_mlp(hidden_sizes=[400, 400], n_classes=10)
    for n_experiences in args.past_experiences:
        steps = time_steps(
            model, penalties(model, n_experiences, 20), step_batch, n_experiences, args.steps
        )
        report(
            {
                "study": "past_experiences",
                "width": 400,
                "past_experiences": n_experiences,
                **{f"step_{k}": v for k, v in steps.items()},
            }
        )
    for n_directions in args.directions:
        steps = time_steps(model, penalties(model, 1, n_directions), step_batch, 1, args.steps)
        seconds = time_flatness_consolidation(
            model, batch, "flatness", max(41, n_directions + 1), n_directions
        )
        report(
            {
                "study": "directions",
                "width": 400,
                "K": n_directions,
                "step_flatness": steps["flatness"],
                "step_naive": steps["naive"],
                "flatness_flatness_seconds": seconds,
            }
        )
    for n_snapshots in args.snapshots:
        n_directions = min(20, n_snapshots - 1)
        report(
            {
                "study": "snapshots",
                "width": 400,
                "n_snapshots": n_snapshots,
                "K": n_directions,
                "flatness_variance_seconds": time_flatness_consolidation(
                    model, batch, "variance", n_snapshots, n_directions
                ),
                "flatness_flatness_seconds": time_flatness_consolidation(
                    model, batch, "flatness", n_snapshots, n_directions
                ),
            }
        )

    # Consolidation after one experience of realistic size, as vsfcl-train runs it:
    # EWC's Fisher pass over the experience against the flatness plugin's SGD probe,
    # PCA and stiffness, interleaved.
    for n_samples in args.experience_samples:
        sample = (batch[0][:n_samples], batch[1][:n_samples], batch[2][:n_samples])
        record = {"study": "consolidation", "width": 400, "experience_samples": n_samples}
        record["fisher_batched_seconds"] = time_fisher(model, sample, "batched", n_samples)
        record["fisher_empirical_seconds"] = time_fisher(model, sample, "empirical", n_samples)
        for stiffness in ("flatness", "variance"):
            record[f"flatness_probe_{stiffness}_seconds"] = time_flatness_consolidation(
                model, sample, stiffness, 40, 20, trajectory="sgd_probe"
            )
        report(record)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"threads": torch.get_num_threads(), "records": records}, indent=2)
        )


if __name__ == "__main__":
    main()
