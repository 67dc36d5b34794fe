"""Time the batched loss-profile evaluation against the one-point-at-a-time loop.

Both run in the same process on the default model (MLP 784-50-50-10) and parameter set
(``features.fc2.weight``, 2500 entries), on the full MNIST training set when it is
provisioned (random inputs of the same shape otherwise, which cost the same). The
workload is a whole flatness search (bracketing and refinement on both sides of every
direction), timed from building the evaluator, so caching activations and layer
responses is paid for. The one-point-at-a-time loop is timed on a few points, and its
per-point cost is scaled to the search's number of loss evaluations. That total is an
estimate, because running the whole search point by point would take many minutes.

    python benchmarks/bench_profiles.py                 # profile evaluation only
    python benchmarks/bench_profiles.py --full-run      # also time a default vsfcl-landscape run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vsfcl.flatness import find_flatness
from vsfcl.landscape.profiles import ProfileEvaluator, reference_losses
from vsfcl.landscape.trajectory import flatten_parameters
from vsfcl.models import MLP


def _training_inputs() -> tuple[torch.Tensor, torch.Tensor, str]:
    from vsfcl.data.mnist import MnistUnavailableError, default_data_root, load_mnist

    try:
        arrays = load_mnist(default_data_root(), sources=("local",))
    except (MnistUnavailableError, OSError, ValueError) as error:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.rand(60000, 784, generator=generator)
        targets = torch.randint(0, 10, (60000,), generator=generator)
        return inputs, targets, f"random inputs (MNIST unavailable: {error})"
    inputs = arrays.train_images.reshape(-1, 784).float() / 255.0
    return inputs, arrays.train_labels.long(), "MNIST training set"


def time_profiles(n_directions: int, n_reference: int) -> dict[str, float]:
    """Time a flatness search with the batched evaluator and the reference loop's cost for it."""
    inputs, targets, source = _training_inputs()
    torch.manual_seed(0)
    model = MLP(784, (50, 50), 10).eval()
    names = ["features.fc2.weight"]
    center = flatten_parameters(model, names)
    q, _ = torch.linalg.qr(torch.randn(center.numel(), n_directions))
    directions = q.T.contiguous()

    # The batched side: build the evaluator and run the whole search.
    start = time.perf_counter()
    evaluator = ProfileEvaluator(model, names, center, directions, inputs, targets)
    loss0 = evaluator.center_loss()
    result = find_flatness(
        evaluator.loss_along(), n_directions, loss0, initial_step=0.5, max_offset=50.0
    )
    batched_seconds = time.perf_counter() - start
    n_points = result.n_evaluations + 1

    # The reference side: time a spread of points and scale to the search's point count.
    index = torch.linspace(0, n_directions - 1, n_reference).long()
    offsets = torch.linspace(-3.0, 3.0, n_reference, dtype=torch.float64)
    start = time.perf_counter()
    reference = reference_losses(model, names, center, directions, index, offsets, inputs, targets)
    reference_per_point = (time.perf_counter() - start) / n_reference
    difference = float((evaluator.losses(index, offsets) - reference).abs().max())

    return {
        "data": source,
        "threads": torch.get_num_threads(),
        "directions": n_directions,
        "points": n_points,
        "batched_seconds": batched_seconds,
        "reference_seconds_estimate": reference_per_point * n_points,
        "batched_ms_per_point": 1000 * batched_seconds / n_points,
        "reference_ms_per_point": 1000 * reference_per_point,
        "ratio": reference_per_point * n_points / batched_seconds,
        "max_abs_difference": difference,
    }


def time_full_run() -> dict[str, float]:
    """Run the default ``vsfcl-landscape`` in a subprocess and return its wall time."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        command = [sys.executable, "-m", "vsfcl.landscape.cli", f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_seconds": wall, **{key: summary["timing"][key] for key in summary["timing"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (default 1)")
    parser.add_argument(
        "--directions", type=int, default=64, help="directions searched (default 64)"
    )
    parser.add_argument(
        "--reference-points",
        type=int,
        default=8,
        help="points timed with the reference loop (default 8)",
    )
    parser.add_argument(
        "--full-run", action="store_true", help="also time a default vsfcl-landscape run"
    )
    arguments = parser.parse_args()
    if arguments.threads < 1:
        parser.error(f"--threads={arguments.threads} must be at least 1")
    torch.set_num_threads(arguments.threads)

    result = time_profiles(arguments.directions, arguments.reference_points)
    print(
        f"flatness search of {result['directions']} directions on the {result['data']}, "
        f"{result['threads']} thread(s), {result['points']} loss evaluations: "
        f"batched {result['batched_seconds']:.1f} s ({result['batched_ms_per_point']:.1f} ms/point), "
        f"one at a time {result['reference_seconds_estimate']:.0f} s estimated "
        f"({result['reference_ms_per_point']:.1f} ms/point measured on {arguments.reference_points} points), "
        f"ratio {result['ratio']:.1f}x (max |difference| {result['max_abs_difference']:.2e})"
    )
    if arguments.full_run:
        timing = time_full_run()
        print(
            f"default vsfcl-landscape run: {timing['wall_seconds']:.0f} s wall "
            f"({timing['total_seconds']:.0f} s inside the pipeline: exploration "
            f"{timing['exploration_seconds']:.0f} s, window {timing['window_seconds']:.0f} s, "
            f"flatness {timing['flatness_seconds']:.0f} s, curvature "
            f"{timing.get('curvature_seconds', 0.0):.0f} s)"
        )


if __name__ == "__main__":
    main()
