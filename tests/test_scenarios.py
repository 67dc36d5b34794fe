import pytest
import torch

from vsfcl.scenarios import permuted_mnist, split_mnist
from vsfcl.tensor_data import TensorLoader, to_avalanche


@pytest.mark.parametrize(
    ("scenario", "n_classes", "n_heads"), [("task", 2, 5), ("domain", 2, 1), ("class", 10, 1)]
)
def test_split_mnist_scenarios(mnist, scenario, n_classes, n_heads):
    benchmark = split_mnist(mnist, scenario=scenario, valid_fraction=0.1, seed=0)
    assert benchmark.n_experiences == 5
    assert (benchmark.n_classes, benchmark.n_heads) == (n_classes, n_heads)
    total_train = sum(len(e) for e in benchmark.streams["train"]) + sum(
        len(e) for e in benchmark.streams["valid"]
    )
    assert total_train == 60_000
    assert sum(len(e) for e in benchmark.streams["test"]) == 10_000
    for index, test in enumerate(benchmark.streams["test"]):
        assert test.x.shape[1] == 784
        assert float(test.x.min()) >= 0.0
        assert float(test.x.max()) <= 1.0
        expected_task = index if scenario == "task" else 0
        assert set(test.t.tolist()) == {expected_task}
        labels = set(test.y.tolist())
        assert labels == ({2 * index, 2 * index + 1} if scenario == "class" else {0, 1})


def test_split_mnist_valid_fraction_and_determinism(mnist):
    first = split_mnist(mnist, scenario="class", valid_fraction=0.2, seed=3)
    second = split_mnist(mnist, scenario="class", valid_fraction=0.2, seed=3)
    for a, b in zip(first.streams["valid"], second.streams["valid"], strict=False):
        assert torch.equal(a.y, b.y)
        assert torch.equal(a.x, b.x)
    train, valid = first.streams["train"][0], first.streams["valid"][0]
    assert len(valid) == round(0.2 * (len(train) + len(valid)))


def test_split_mnist_subsampling(mnist):
    benchmark = split_mnist(
        mnist, scenario="task", train_samples=100, test_samples=40, valid_fraction=0.1
    )
    assert [len(e) for e in benchmark.streams["train"]] == [90] * 5
    assert [len(e) for e in benchmark.streams["valid"]] == [10] * 5
    assert [len(e) for e in benchmark.streams["test"]] == [40] * 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_experiences": 3}, "n_experiences=3 does not divide the 10 MNIST classes"),
        ({"scenario": "instance"}, "scenario='instance' is not a split MNIST scenario"),
        ({"valid_fraction": 1.0}, "valid_fraction=1.0 is out of range"),
        ({"class_order": [0, 1, 2]}, "must be a permutation"),
        ({"train_samples": 0}, "train_samples=0"),
    ],
)
def test_split_mnist_rejects_bad_settings(mnist, kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_mnist(mnist, **kwargs)


def test_permuted_mnist_permutes_pixels_not_labels(mnist):
    benchmark = permuted_mnist(mnist, n_experiences=3, train_samples=500, seed=0)
    assert benchmark.n_experiences == 3
    assert (benchmark.n_classes, benchmark.n_heads) == (10, 1)
    first, second = benchmark.streams["test"][0], benchmark.streams["test"][1]
    # The same test images in a different pixel order: equal pixel sums, different layout.
    torch.testing.assert_close(first.x.sum(1), second.x.sum(1))
    assert not torch.equal(first.x, second.x)
    assert torch.equal(first.y, second.y)
    with pytest.raises(ValueError, match="n_experiences=0 must be at least 1"):
        permuted_mnist(mnist, n_experiences=0)


def test_avalanche_scenario_carries_tensors(mnist):
    benchmark = split_mnist(mnist, scenario="task", train_samples=50, test_samples=20)
    scenario = to_avalanche(benchmark)
    assert len(scenario.train_stream) == 5
    assert len(scenario.valid_stream) == 5
    experience = scenario.train_stream[2]
    x, y, t = experience.dataset[0]
    assert int(t) == 2
    assert torch.equal(experience.tensors.y, benchmark.streams["train"][2].y)
    assert experience.task_label == 2


def test_tensor_loader_visits_every_sample_once_per_epoch():
    from vsfcl.scenarios import ExperienceTensors

    data = ExperienceTensors(
        torch.arange(10.0)[:, None], torch.arange(10), torch.zeros(10, dtype=torch.long)
    )
    loader = TensorLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    assert len(loader) == 3
    for _ in range(2):
        seen = torch.cat([batch[1] for batch in loader])
        assert sorted(seen.tolist()) == list(range(10))
    assert len(TensorLoader(data, batch_size=4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size=0"):
        TensorLoader(data, batch_size=0)
