"""Fisher estimates, the EWC penalty, MAS and LwF against independent references and Avalanche."""

from types import SimpleNamespace

import pytest
import torch
from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin
from avalanche.training.plugins import MASPlugin
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn import functional as F

from vsfcl.baselines import LwFPlugin, TensorMASPlugin
from vsfcl.ewc import (
    DiagonalQuadraticPenalty,
    EWCPlugin,
    PerSampleSquaredGradients,
    experience_batches,
    fisher_diagonal,
)
from vsfcl.models import build_mlp
from vsfcl.scenarios import ExperienceTensors, TensorBenchmark
from vsfcl.strategies import build_method_plugin, build_strategy
from vsfcl.tensor_data import to_avalanche, with_tensor_data
from vsfcl.train import config_dir, run


def _data(n=40, n_classes=3, n_tasks=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=generator)
    t = torch.randint(0, n_tasks, (n,), generator=generator)
    return x, y, t


def _model(n_heads=1, n_classes=3, seed=0):
    torch.manual_seed(seed)
    return build_mlp(
        hidden_sizes=[5, 4], n_classes=n_classes, n_heads=n_heads, input_size=6
    ).double()


def _forward(model, x, t):
    return model(x, t) if hasattr(model, "heads") else model(x)


def _reference_fisher(model, x, y, t, labels_per_sample):
    """Per-sample squared gradients by a plain loop, weighted by (label, weight) pairs."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for n in range(len(x)):
        for label, weight in labels_per_sample(n):
            model.zero_grad()
            F.cross_entropy(
                _forward(model, x[n : n + 1], t[n : n + 1]), torch.tensor([label])
            ).backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    total[name] += weight * p.grad.square()
    return {name: value / len(x) for name, value in total.items()}


@pytest.mark.parametrize("n_heads", [1, 3])
def test_empirical_fisher_matches_loop(n_heads):
    model = _model(n_heads)
    x, y, t = _data(n_tasks=n_heads)
    fisher = fisher_diagonal(
        model, iter([(x[:25], y[:25], t[:25]), (x[25:], y[25:], t[25:])]), "empirical"
    )
    reference = _reference_fisher(model, x, y, t, lambda n: [(int(y[n]), 1.0)])
    for name in reference:
        torch.testing.assert_close(fisher[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("n_heads", [1, 3])
def test_exact_fisher_matches_loop(n_heads):
    model = _model(n_heads)
    x, y, t = _data(n_tasks=n_heads)
    with torch.no_grad():
        probabilities = torch.softmax(_forward(model, x, t), dim=1)
    fisher = fisher_diagonal(model, iter([(x, y, t)]), "exact")
    reference = _reference_fisher(
        model, x, y, t, lambda n: [(c, float(probabilities[n, c])) for c in range(3)]
    )
    for name in reference:
        torch.testing.assert_close(fisher[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("n_heads", [1, 3])
def test_linear_shortcut_matches_vmap(n_heads):
    model = _model(n_heads)
    x, y, t = _data(n_tasks=n_heads)
    shortcut = PerSampleSquaredGradients(model)
    general = PerSampleSquaredGradients(model, linear_shortcut=False)
    assert shortcut.linear and not general.linear
    weights = torch.rand(len(x), dtype=torch.float64)
    fast, slow = shortcut(x, y, t, weights), general(x, y, t, weights)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-9, atol=1e-12, msg=name)


def test_sampled_fisher_is_seeded():
    model = _model()
    x, y, t = _data(n=200)

    def estimate(seed):
        return fisher_diagonal(
            model, iter([(x, y, t)]), "sampled", torch.Generator().manual_seed(seed)
        )

    first, again, other = estimate(1), estimate(1), estimate(2)
    empirical = fisher_diagonal(model, iter([(x, y, t)]), "empirical")
    name = "head.weight"
    torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert not torch.allclose(first[name], other[name])
    assert not torch.allclose(first[name], empirical[name])


def test_batched_fisher_matches_avalanche():
    model = _model().float()
    x, y, t = _data(n=70)
    x = x.float()
    benchmark = TensorBenchmark(
        "toy", {"train": [ExperienceTensors(x, y, t)]}, n_classes=3, n_heads=1
    )
    experience = to_avalanche(benchmark).train_stream[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    avalanche = AvalancheEWCPlugin(1.0).compute_importances(
        model, nn.CrossEntropyLoss(), optimizer, experience.dataset, torch.device("cpu"), 32
    )
    ours = fisher_diagonal(
        model,
        iter([(x[i : i + 32], y[i : i + 32], t[i : i + 32]) for i in range(0, 70, 32)]),
        "batched",
    )
    for name, value in avalanche.items():
        torch.testing.assert_close(ours[name], value.data, rtol=1e-5, atol=1e-9, msg=name)


def test_penalty_equals_sum_of_quadratics():
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).double()
    shapes = {name: p.shape for name, p in model.named_parameters()}
    # Some importances are exactly zero, as for unused heads, to cover the m = w* fallback.
    experiences = [
        (
            {
                n: torch.rand(s, generator=generator, dtype=torch.float64)
                * (torch.rand(s, generator=generator) > 0.3)
                for n, s in shapes.items()
            },
            {
                n: torch.randn(s, generator=generator, dtype=torch.float64)
                for n, s in shapes.items()
            },
        )
        for _ in range(3)
    ]
    penalty = DiagonalQuadraticPenalty()
    for importances, anchor in experiences:
        penalty.add(importances, anchor)

    value = penalty(model)
    reference = torch.stack(
        [
            (importances[n] * (p - anchor[n]).square()).sum()
            for importances, anchor in experiences
            for n, p in model.named_parameters()
        ]
    ).sum()
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    gradient = torch.autograd.grad(value, list(model.parameters()))
    expected = torch.autograd.grad(reference, list(model.parameters()))
    for ours, theirs in zip(gradient, expected, strict=False):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_penalty_is_zero_at_single_anchor():
    model = nn.Linear(3, 2).double()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalty = DiagonalQuadraticPenalty()
    penalty.add({n: torch.ones_like(p) for n, p in anchor.items()}, anchor)
    assert float(penalty(model).detach()) == 0.0


def test_online_penalty_decays_old_fisher():
    model = nn.Linear(2, 1).double()
    names = [n for n, _ in model.named_parameters()]
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    first_anchor = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    last_anchor = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    penalty = DiagonalQuadraticPenalty()
    penalty.decay_and_add(ones, first_anchor, decay=0.5)
    penalty.decay_and_add({n: 3 * v for n, v in ones.items()}, last_anchor, decay=0.5)
    for name in names:
        torch.testing.assert_close(penalty.precision[name], torch.full_like(ones[name], 3.5))
        torch.testing.assert_close(penalty.mean[name], last_anchor[name])


def _compose_strategy(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        options = dict(compose("train", overrides=overrides).strategy)
    return options.pop("name"), options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=ewc", "strategy.fisher=bogus"], r"strategy.fisher='bogus' is invalid"),
        (["strategy=ewc", "strategy.fisher_samples=0"], r"strategy.fisher_samples=0 is invalid"),
        (
            ["strategy=online_ewc", "strategy.decay_factor=1.5"],
            r"strategy.decay_factor=1.5 is out of range",
        ),
        (["strategy=mas", "strategy.alpha=2"], r"strategy.alpha=2.0 is out of range"),
        (["strategy=mas", "strategy.mas_lambda=-1"], r"strategy.mas_lambda=-1 is out of range"),
        (["strategy=lwf", "strategy.temperature=0"], r"strategy.temperature=0 is out of range"),
        (
            ["strategy=synaptic_intelligence", "strategy.si_lambda=nan"],
            r"strategy.si_lambda=nan is invalid",
        ),
    ],
)
def test_bad_baseline_options_rejected(overrides, message):
    name, options = _compose_strategy(overrides)
    with pytest.raises(ValueError, match=message):
        build_method_plugin(name, options)


@pytest.mark.parametrize("fisher", ["batched", "empirical", "sampled", "exact"])
def test_fisher_choice_reaches_plugin(fisher):
    name, options = _compose_strategy(
        ["strategy=ewc", f"strategy.fisher={fisher}", "strategy.ewc_lambda=5"]
    )
    plugin = build_method_plugin(name, options)
    assert isinstance(plugin, EWCPlugin)
    assert (plugin.fisher, plugin.mode, plugin.ewc_lambda) == (fisher, "separate", 5.0)


def _toy_scenario(n_experiences=2, n=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    streams = {"train": [], "test": []}
    for k in range(n_experiences):
        for stream in streams:
            x = torch.rand(n, 784, generator=generator)
            y = torch.randint(0, 2, (n,), generator=generator)
            streams[stream].append(ExperienceTensors(x, y, torch.full_like(y, k)))
    return to_avalanche(TensorBenchmark("toy", streams, n_classes=2, n_heads=n_experiences))


def _strategy(plugin, model, fast=True, epochs=1):
    return build_strategy(
        name="naive",
        options={},
        model=model,
        make_optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        evaluator=_quiet_evaluator(),
        extra_plugins=[plugin],
        final_plugins=[],
        train_epochs=epochs,
        batch_size=32,
        eval_batch_size=100,
        device=torch.device("cpu"),
        fast_data=fast,
    ).strategy


def _quiet_evaluator():
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(loggers=[])


def test_ewc_plugin_matches_avalanche_ewc():
    scenario = _toy_scenario()
    weights = {}
    for label, plugin in (
        ("ours", EWCPlugin(50.0, fisher="batched")),
        ("avalanche", AvalancheEWCPlugin(50.0)),
    ):
        torch.manual_seed(0)
        model = build_mlp(hidden_sizes=[16], n_classes=2, n_heads=2)
        strategy = _strategy(plugin, model)
        for experience in scenario.train_stream:
            strategy.train(experience)
        weights[label] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(weights["ours"], weights["avalanche"], rtol=1e-4, atol=1e-5)


def test_mas_importance_matches_avalanche():
    scenario = _toy_scenario(n_experiences=1)
    importances = {}
    for label, plugin in (("ours", TensorMASPlugin(1.0)), ("avalanche", MASPlugin(1.0))):
        torch.manual_seed(0)
        model = build_mlp(hidden_sizes=[16], n_classes=2, n_heads=1)
        strategy = _strategy(plugin, model)
        strategy.experience = scenario.train_stream[0]
        importances[label] = plugin._get_importance(strategy)
    for name, value in importances["avalanche"].items():
        torch.testing.assert_close(
            importances["ours"][name].data, value.data, rtol=1e-5, atol=1e-9, msg=name
        )


def _lwf_strategy(model, x, t):
    output = model(x, t) if hasattr(model, "heads") else model(x)
    return SimpleNamespace(model=model, mb_x=x, mb_output=output, loss=torch.zeros(()))


@pytest.mark.parametrize("n_heads", [1, 2])
def test_lwf_penalty_zero_until_model_moves(n_heads):
    scenario = _toy_scenario(n_experiences=2)
    torch.manual_seed(0)
    model = build_mlp(hidden_sizes=[8], n_classes=2, n_heads=n_heads)
    plugin = LwFPlugin(alpha=1.0, temperature=2.0)
    experience = scenario.train_stream[0]
    experience.tensors = (
        experience.tensors
        if n_heads == 2
        else ExperienceTensors(
            experience.tensors.x, experience.tensors.y, torch.zeros_like(experience.tensors.t)
        )
    )
    plugin.after_training_exp(SimpleNamespace(model=model, experience=experience))
    assert plugin.seen_units == {0: {0, 1}}

    x, t = scenario.train_stream[1].tensors.x[:16], torch.ones(16, dtype=torch.long) * (n_heads - 1)
    strategy = _lwf_strategy(model, x, t)
    plugin.before_backward(strategy)
    assert float(strategy.loss) == pytest.approx(0.0, abs=1e-7)

    with torch.no_grad():
        model.features.fc1.weight.add_(0.5)
    strategy = _lwf_strategy(model, x, t)
    plugin.before_backward(strategy)
    assert float(strategy.loss) > 1e-4
    strategy.loss.backward()
    assert model.features.fc1.weight.grad is not None


def test_lwf_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature=0.0 must be positive"):
        LwFPlugin(alpha=1.0, temperature=0.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=ewc", "strategy.fisher=empirical"],
        ["strategy=online_ewc", "strategy.fisher=sampled"],
        ["strategy=synaptic_intelligence"],
        ["strategy=mas"],
        ["strategy=lwf"],
    ],
)
def test_baseline_trains_on_task_split_mnist(mnist, tmp_path, overrides):
    quick = [
        "benchmark.train_samples=300",
        "benchmark.test_samples=100",
        "train_epochs=1",
        "batch_size=32",
        "progress_bar=false",
        "benchmark.scenario=task",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*quick, *overrides])
    results = run(cfg, tmp_path)
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    # Two-way task-incremental heads after a short run are far above chance on their own task.
    assert min(matrix[k][k] for k in range(5)) > 0.7
    assert len(results["consolidation_seconds"]) == 5


def test_experience_batches_fast_equals_dataloader():
    scenario = _toy_scenario(n_experiences=1, n=70)
    experience = scenario.train_stream[0]
    model = build_mlp(hidden_sizes=[8], n_classes=2, n_heads=1)
    fast = _strategy(EWCPlugin(1.0), model, fast=True)
    stock = _strategy(EWCPlugin(1.0), model, fast=False)
    assert type(fast) is with_tensor_data(type(stock))
    fast.experience = stock.experience = experience
    fast_batches = list(experience_batches(fast, 32, max_samples=50))
    stock_batches = list(experience_batches(stock, 32, max_samples=50))
    assert [len(b[1]) for b in fast_batches] == [32, 18]
    for ours, theirs in zip(fast_batches, stock_batches, strict=False):
        for a, b in zip(ours, theirs, strict=False):
            torch.testing.assert_close(a, b)


def _penalty_after(plugin, model, x, t):
    strategy = _lwf_strategy(model, x, t)
    strategy.clock = SimpleNamespace(train_exp_counter=2)
    strategy.device = torch.device("cpu")
    # Avalanche's MAS rejects a loss that is exactly zero, so start from 1.
    strategy.loss = torch.ones(())
    plugin.before_backward(strategy)
    return float(strategy.loss.detach()) - 1.0


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "synaptic_intelligence", "mas", "lwf"])
def test_plugin_state_round_trip(name, tmp_path):
    scenario = _toy_scenario()
    _, options = _compose_strategy([f"strategy={name}"])
    plugin = build_method_plugin(name, options)
    torch.manual_seed(0)
    model = build_mlp(hidden_sizes=[16], n_classes=2, n_heads=2)
    strategy = _strategy(plugin, model)
    for experience in scenario.train_stream:
        strategy.train(experience)

    torch.save(plugin.state_dict(), tmp_path / "state.pt")
    restored = build_method_plugin(name, options)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))

    with torch.no_grad():
        model.features.fc1.weight.add_(0.05)
    x, t = scenario.train_stream[1].tensors.x[:16], torch.ones(16, dtype=torch.long)
    expected = _penalty_after(plugin, model, x, t)
    assert expected > 0.0
    assert _penalty_after(restored, model, x, t) == pytest.approx(expected, rel=1e-6)


def test_si_importance_nonzero_on_cpu():
    scenario = _toy_scenario(n_experiences=1)
    _, options = _compose_strategy(["strategy=synaptic_intelligence"])
    plugin = build_method_plugin("synaptic_intelligence", options)
    torch.manual_seed(0)
    model = build_mlp(hidden_sizes=[16], n_classes=2, n_heads=1)
    strategy = _strategy(plugin, model)
    strategy.train(scenario.train_stream[0])
    importance = plugin.ewc_data[1]["features.fc1.weight"].data
    anchor = plugin.ewc_data[0]["features.fc1.weight"].data
    assert float(importance.abs().sum()) > 0.0
    # The anchor is a copy: moving the weights must not move it.
    with torch.no_grad():
        model.features.fc1.weight.add_(1.0)
    assert not torch.allclose(anchor, model.features.fc1.weight.flatten())
