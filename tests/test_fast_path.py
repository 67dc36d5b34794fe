"""The tensor data path: same batches and weights as a bare PyTorch loop, less overhead than Avalanche's loader."""

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from torch.nn import functional as F

from vsfcl.models import build_mlp
from vsfcl.scenarios import ExperienceTensors, permuted_mnist
from vsfcl.strategies import build_strategy
from vsfcl.tensor_data import TensorLoader, to_avalanche


def _tensors(n=10):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(n)
    return ExperienceTensors(x, y, torch.zeros(n, dtype=torch.long))


def test_loader_covers_every_sample_once():
    loader = TensorLoader(
        _tensors(10), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(2):
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [4, 4, 2]
        labels = torch.cat([b[1] for b in batches])
        assert sorted(labels.tolist()) == list(range(10))
        for x, y, _t in batches:
            torch.testing.assert_close(x[:, 0], y.float())


def test_loader_reshuffles_reproducibly():
    def orders(seed):
        loader = TensorLoader(
            _tensors(50), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        return [next(iter(loader))[1].tolist() for _ in range(2)]

    first, again = orders(3), orders(3)
    assert first == again
    assert first[0] != first[1]


def test_loader_drop_last_and_bad_size():
    assert len(TensorLoader(_tensors(10), batch_size=4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        TensorLoader(_tensors(10), batch_size=0)


def _train(model, experience, fast):
    strategy = build_strategy(
        name="naive",
        options={},
        model=model,
        make_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        evaluator=EvaluationPlugin(loggers=[]),
        extra_plugins=[],
        final_plugins=[],
        train_epochs=1,
        batch_size=64,
        eval_batch_size=500,
        device=torch.device("cpu"),
        fast_data=fast,
        loader_seed=0,
    ).strategy
    strategy.train(experience)
    return model


def _permuted(mnist, n):
    benchmark = permuted_mnist(
        mnist, n_experiences=1, valid_fraction=0.0, seed=0, train_samples=n, test_samples=1000
    )
    return benchmark, to_avalanche(benchmark).train_stream[0]


@pytest.mark.slow
def test_fast_path_equals_bare_loop(mnist):
    benchmark, experience = _permuted(mnist, 640)
    torch.manual_seed(0)
    initial = build_mlp(hidden_sizes=[32], n_classes=10).state_dict()
    fast = build_mlp(hidden_sizes=[32], n_classes=10)
    fast.load_state_dict(initial)
    _train(fast, experience, fast=True)

    bare = build_mlp(hidden_sizes=[32], n_classes=10)
    bare.load_state_dict(initial)
    optimizer = torch.optim.Adam(bare.parameters(), lr=1e-3)
    data = benchmark.streams["train"][0]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(data), 64):
        index = order[start : start + 64]
        loss = F.cross_entropy(bare(data.x[index]), data.y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for (name, a), b in zip(fast.named_parameters(), bare.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fast_and_stock_paths_learn_alike(mnist):
    # Speed is measured by benchmarks/speed.py; this checks behaviour only.
    benchmark, experience = _permuted(mnist, 3000)
    test = benchmark.streams["test"][0]
    torch.manual_seed(0)
    initial = build_mlp(hidden_sizes=[32], n_classes=10).state_dict()
    accuracy = {}
    for fast in (True, False):
        model = build_mlp(hidden_sizes=[32], n_classes=10)
        model.load_state_dict(initial)
        _train(model, experience, fast)
        with torch.no_grad():
            accuracy[fast] = float((model(test.x).argmax(1) == test.y).float().mean())
    # Different batch orders, same learning: one epoch on 3,000 images.
    assert abs(accuracy[True] - accuracy[False]) < 0.05, accuracy
