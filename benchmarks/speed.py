"""Training throughput of three data paths on one epoch of permuted MNIST, side by side in one process.

Paths, each training a fresh MLP from the same initial weights with Adam:

- ``stock``: what a researcher gets from Avalanche 0.6.0 out of the box: its classic
  ``PermutedMNIST`` benchmark (torchvision's MNIST, with per-sample PIL conversion,
  normalization and permutation transforms) trained by its ``Naive`` strategy;
- ``stock_tensors``: the same strategy over vsfcl's benchmark tensors wrapped as an
  ``AvalancheDataset``, still read through a ``DataLoader`` (per-sample
  ``__getitem__`` and collate, no image transforms);
- ``fast``: the same strategy with vsfcl's tensor data path (``fast_data=true``), with
  the evaluator and plugins that ``vsfcl-train`` uses;
- ``fast_fused``: ``fast`` with PyTorch's fused Adam (``optimizer.fused=true`` in
  ``vsfcl-train``), which speeds up the model step, not the data path;
- ``bare``: a plain PyTorch loop over the same tensors, no Avalanche.

The paths run in turn, ``--repeats`` times, so that a slowdown of the shared machine
hits all of them. The ratios are taken within each repetition. After each epoch the
test accuracy of the experience is printed, to check that the paths learn alike.

It also times the importance pass of EWC after the epoch: Avalanche's
``EWCPlugin.compute_importances`` (per-sample ``DataLoader``) against
:func:`vsfcl.ewc.fisher_diagonal` on the tensors, for each Fisher estimate.

Example::

    OMP_NUM_THREADS=1 python benchmarks/speed.py --repeats 3 --json benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.classic import PermutedMNIST
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin
from torch import nn
from torch.nn import functional as F

from vsfcl.data.mnist import load_mnist, mnist_raw_dir
from vsfcl.ewc import FISHER_ESTIMATES, experience_batches, fisher_diagonal
from vsfcl.models import build_mlp
from vsfcl.scenarios import permuted_mnist
from vsfcl.strategies import build_strategy
from vsfcl.tensor_data import to_avalanche


def make_evaluator(per_iteration_metrics: bool) -> EvaluationPlugin:
    """Build an evaluator with the metrics of ``vsfcl-train`` (loss tracked every iteration) or evaluation metrics only."""
    metrics: list[Any] = [accuracy_metrics(experience=True, stream=True)]
    if per_iteration_metrics:
        metrics.append(loss_metrics(epoch=True, experience=True, stream=True))
    return EvaluationPlugin(*metrics, loggers=[])


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
        for i in range(0, len(y), 1000)
    )
    model.train()
    return correct / len(y)


def train_avalanche(
    fast: bool,
    per_iteration_metrics: bool,
    initial: dict,
    experience: Any,
    args: argparse.Namespace,
    fused: bool | None = None,
) -> nn.Module:
    model = build_mlp(hidden_sizes=args.hidden_sizes, n_classes=10)
    model.load_state_dict(initial)
    model.to(args.device)
    naive_strategy(model, fast, per_iteration_metrics, args, fused).train(experience)
    return model


def naive_strategy(
    model: nn.Module,
    fast: bool,
    per_iteration_metrics: bool,
    args: argparse.Namespace,
    fused: bool | None = None,
) -> Any:
    """Build the ``Naive`` strategy of ``vsfcl-train`` with Adam 1e-3, one epoch."""
    return build_strategy(
        name="naive",
        options={},
        model=model,
        make_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, fused=fused),
        evaluator=make_evaluator(per_iteration_metrics),
        extra_plugins=[],
        final_plugins=[],
        train_epochs=1,
        batch_size=args.batch_size,
        eval_batch_size=1000,
        device=args.device,
        fast_data=fast,
        loader_seed=0,
    ).strategy


def train_classic(initial: dict, experience: Any, args: argparse.Namespace) -> nn.Module:
    """Train on Avalanche's own permuted-MNIST experience with its ``Naive`` strategy."""
    model = build_mlp(hidden_sizes=args.hidden_sizes, n_classes=10)
    model.load_state_dict(initial)
    model.to(args.device)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size,
        train_epochs=1,
        eval_mb_size=1000,
        device=args.device,
        evaluator=make_evaluator(True),
    )
    strategy.train(experience)
    return model


def classic_experience(args: argparse.Namespace) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Return Avalanche's classic permuted-MNIST training experience and its test set.

    The training experience is capped like ours. The test images go through
    Avalanche's own transforms (its permutation differs from vsfcl's), gathered once
    into tensors on ``args.device``.
    """
    benchmark = PermutedMNIST(
        n_experiences=1, seed=0, dataset_root=str(mnist_raw_dir().parent.parent)
    )
    experience = benchmark.train_stream[0]
    if args.train_samples is not None:
        # Avalanche's training set is sorted by class, so take a random subset.
        order = torch.randperm(len(experience.dataset), generator=torch.Generator().manual_seed(0))
        experience.dataset = experience.dataset.subset(order[: args.train_samples].tolist())
    test = benchmark.test_stream[0].dataset
    images = torch.stack([test[i][0] for i in range(len(test))]).to(args.device)
    labels = torch.tensor([int(test[i][1]) for i in range(len(test))]).to(args.device)
    return experience, images, labels


def train_bare(
    initial: dict, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> nn.Module:
    model = build_mlp(hidden_sizes=args.hidden_sizes, n_classes=10)
    model.load_state_dict(initial)
    model.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(args.device)
    for start in range(0, len(y), args.batch_size):
        index = order[start : start + args.batch_size]
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def time_call(function: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``function`` and return its value and wall seconds, waiting for queued CUDA work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="repetitions of each path, interleaved"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[400, 400])
    parser.add_argument(
        "--device", type=torch.device, default=torch.device("cpu"), help="cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="cap on training images (default: all 60,000)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads; default: leave as is"
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["stock", "stock_tensors", "fast", "fast_lean", "fast_fused", "bare"],
    )
    parser.add_argument(
        "--fisher",
        nargs="*",
        default=["batched", "empirical", "sampled"],
        choices=FISHER_ESTIMATES,
        help="Fisher estimates to time after the epoch (exact costs one pass per class)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # One permuted-MNIST experience with all 60,000 training images (no validation split).
    benchmark = permuted_mnist(
        load_mnist(None),
        n_experiences=1,
        valid_fraction=0.0,
        seed=0,
        train_samples=args.train_samples,
    )
    scenario = to_avalanche(benchmark)
    experience = scenario.train_stream[0]
    train, test = (
        benchmark.streams["train"][0].to(args.device),
        benchmark.streams["test"][0].to(args.device),
    )
    torch.manual_seed(0)
    initial = build_mlp(hidden_sizes=args.hidden_sizes, n_classes=10).state_dict()
    print(
        f"permuted MNIST, {len(train)} training images, MLP {args.hidden_sizes}, batch {args.batch_size}, "
        f"device {args.device}, {torch.get_num_threads()} torch threads"
    )

    classic = classic_experience(args) if "stock" in args.paths else None
    paths: dict[str, Callable[[], nn.Module]] = {
        "stock": lambda: train_classic(initial, classic[0], args),  # type: ignore[index]
        "stock_tensors": lambda: train_avalanche(False, True, initial, experience, args),
        "fast": lambda: train_avalanche(True, True, initial, experience, args),
        "fast_lean": lambda: train_avalanche(True, False, initial, experience, args),
        "fast_fused": lambda: train_avalanche(True, True, initial, experience, args, fused=True),
        "bare": lambda: train_bare(initial, train.x, train.y, args),
    }
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in args.paths}
    for repeat in range(args.repeats):
        for name in args.paths:
            model, seconds = time_call(paths[name], args.device)
            # Each path is scored on the test images of its own benchmark.
            if name == "stock" and classic is not None:
                accuracy = evaluate_accuracy(model, classic[1], classic[2])
            else:
                accuracy = evaluate_accuracy(model, test.x, test.y)
            rows[name].append(
                {
                    "seconds": seconds,
                    "samples_per_second": len(train) / seconds,
                    "test_accuracy": accuracy,
                }
            )
            print(
                f"repeat {repeat} {name:<9} {seconds:7.2f} s  {len(train) / seconds:8.0f} samples/s  test acc {accuracy:.4f}",
                flush=True,
            )

    print("\nmedian samples/s and ratios within each repetition:")
    for name in args.paths:
        print(
            f"  {name:<9} {statistics.median(r['samples_per_second'] for r in rows[name]):8.0f} samples/s"
        )
    ratios = {}
    for a, b in (
        ("fast", "stock"),
        ("fast_lean", "stock"),
        ("fast_fused", "stock"),
        ("fast", "stock_tensors"),
        ("stock_tensors", "stock"),
        ("bare", "fast"),
        ("bare", "fast_lean"),
    ):
        if a in rows and b in rows:
            values = [
                ra["samples_per_second"] / rb["samples_per_second"]
                for ra, rb in zip(rows[a], rows[b], strict=False)
            ]
            ratios[f"{a}/{b}"] = values
            print(
                f"  {a}/{b}: median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"
            )

    # EWC's importance pass after the epoch: Avalanche's per-sample loader against the tensors.
    model = build_mlp(hidden_sizes=args.hidden_sizes, n_classes=10)
    model.load_state_dict(initial)
    model.to(args.device)
    strategy = naive_strategy(model, fast=True, per_iteration_metrics=False, args=args)
    strategy.experience = experience
    fisher_seconds: dict[str, float] = {}
    _, fisher_seconds["avalanche_batched"] = time_call(
        lambda: AvalancheEWCPlugin(1.0).compute_importances(
            model,
            nn.CrossEntropyLoss(),
            strategy.optimizer,
            experience.dataset,
            args.device,
            args.batch_size,
        ),
        args.device,
    )
    for estimate in args.fisher:
        _, fisher_seconds[estimate] = time_call(
            lambda estimate=estimate: fisher_diagonal(
                model,
                experience_batches(strategy, args.batch_size),
                estimate,
                torch.Generator().manual_seed(0),
            ),
            args.device,
        )
    print(f"\nEWC importance pass over the {len(train)} images:")
    for name, seconds in fisher_seconds.items():
        print(f"  {name:<18} {seconds:7.2f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": str(args.device),
                    "threads": torch.get_num_threads(),
                    "paths": rows,
                    "ratios": ratios,
                    "fisher_seconds": fisher_seconds,
                    "hidden_sizes": args.hidden_sizes,
                    "batch_size": args.batch_size,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
