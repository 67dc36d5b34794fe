"""FlatnessPlugin on models whose loss is known in closed form, and inside Avalanche."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vsfcl.plugin import FlatnessPlugin, select_parameters

CURVATURES = torch.tensor([50.0, 8.0, 2.0, 0.5], dtype=torch.float64)
LOSS0 = 0.3


class QuadraticBowl(nn.Module):
    """A 'model' whose output is its own weights, so the criterion can be a bowl in them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], 4)


def bowl_criterion(output, targets):
    return LOSS0 + 0.5 * torch.sum(CURVATURES * output[0] ** 2)


def quartic_criterion(output, targets):
    return LOSS0 + torch.sum(CURVATURES * output[0] ** 4)


def _strategy(criterion):
    batch = [torch.zeros(8, 1), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)]
    return SimpleNamespace(
        model=QuadraticBowl(),
        _criterion=criterion,
        device=torch.device("cpu"),
        dataloader=[batch],
        experience=SimpleNamespace(current_experience=0),
    )


def _plant_snapshots(plugin: FlatnessPlugin, stds) -> None:
    """Snapshots that vary along the coordinate axes with decreasing spread."""
    # Sines of distinct whole frequencies are exactly orthogonal and centred over a period.
    times = torch.arange(200, dtype=torch.float64)[:, None]
    frequencies = torch.arange(1, 5, dtype=torch.float64)
    coordinates = (
        math.sqrt(2) * torch.sin(2 * math.pi * frequencies * times / 200) * torch.tensor(stds)
    )
    plugin._snapshots = list(coordinates.to(torch.float32))


@pytest.mark.parametrize("source", ["flatness", "hessian"])
def test_stiffness_of_quadratic_bowl_matches_curvature(source):
    plugin = FlatnessPlugin(n_directions=4, n_snapshots=200, stiffness=source, profile_rtol=1e-6)
    strategy = _strategy(bowl_criterion)
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    plugin.after_training_exp(strategy)

    subspace = plugin.penalty.subspaces[0]
    # The planted variances put the axes in order, so direction i is axis i (up to sign).
    torch.testing.assert_close(
        subspace.directions.abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-2
    )
    torch.testing.assert_close(subspace.stiffness, CURVATURES, rtol=5e-3, atol=0)
    # The model is left exactly at the anchor.
    torch.testing.assert_close(strategy.model.w.detach(), torch.zeros(4, dtype=torch.float64))


def test_flatness_of_quartic_bowl_matches_closed_form():
    plugin = FlatnessPlugin(
        n_directions=4, n_snapshots=200, stiffness="flatness", profile_rtol=1e-6
    )
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    plugin.after_training_exp(_strategy(quartic_criterion))
    consolidation = plugin.consolidations[0]
    # L0 + c theta^4 reaches e L0 at theta = ((e - 1) L0 / c)^(1/4) on both sides.
    expected = 2 * ((math.e - 1) * LOSS0 / CURVATURES) ** 0.25
    torch.testing.assert_close(
        torch.tensor(consolidation.flatness, dtype=torch.float64), expected, rtol=1e-4, atol=0
    )
    assert consolidation.n_censored == 0
    assert consolidation.loss0 == pytest.approx(LOSS0)


def test_censored_direction_gets_stiffness_of_search_range():
    def half_flat(output, targets):
        # The last coordinate does not change the loss at all.
        return LOSS0 + 0.5 * torch.sum(CURVATURES[:3] * output[0, :3] ** 2)

    plugin = FlatnessPlugin(n_directions=4, n_snapshots=200, profile_max_offset=10.0)
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    plugin.after_training_exp(_strategy(half_flat))
    consolidation = plugin.consolidations[0]
    assert consolidation.n_censored == 1
    assert consolidation.flatness[3] is None
    expected = 8 * (math.e - 1) * LOSS0 / 20.0**2
    assert consolidation.stiffness[3] == pytest.approx(expected, rel=1e-9)


def test_zero_loss_raises_with_advice():
    plugin = FlatnessPlugin(n_directions=2, n_snapshots=200)
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    with pytest.raises(ValueError, match="stiffness='variance'"):
        plugin.after_training_exp(_strategy(lambda output, targets: 0.0 * output.sum()))


def test_penalty_pulls_back_only_along_kept_directions():
    plugin = FlatnessPlugin(strength=2.0, n_directions=2, n_snapshots=200, stiffness="hessian")
    strategy = _strategy(bowl_criterion)
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    plugin.after_training_exp(strategy)
    with torch.no_grad():
        strategy.model.w.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    strategy.loss = torch.zeros((), dtype=torch.float64)
    plugin.before_backward(strategy)
    # Only axes 0 and 1 are kept: lambda/2 * (50 * 0.1^2 + 8 * 0.2^2).
    assert float(strategy.loss) == pytest.approx(0.5 * 2.0 * (50 * 0.01 + 8 * 0.04), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": -1.0}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"n_directions": 40, "n_snapshots": 40}, "n_directions=40 is out of range"),
        ({"n_directions": 0}, "n_directions=0 is out of range"),
        ({"window_fraction": 0.0}, "window_fraction=0.0 is out of range"),
        ({"stiffness": "fisher"}, "stiffness='fisher' is invalid"),
        ({"n_snapshots": 1}, "n_snapshots=1"),
        ({"max_directions": 0}, "max_directions=0 is invalid"),
        ({"update": "projection"}, "update='projection' is invalid"),
        ({"trajectory": "adam"}, "trajectory='adam' is invalid"),
        ({"probe_lr": 0.0}, "probe_lr=0.0 is invalid"),
        ({"probe_interval": 0}, "probe_interval=0"),
    ],
)
def test_plugin_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlatnessPlugin(**kwargs)


def test_select_parameters_rejects_unknown_pattern():
    model = nn.Sequential(nn.Linear(2, 2))
    assert [n for n, _ in select_parameters(model, ["0.weight"])] == ["0.weight"]
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, ["features.*"])


def _train_one_step(plugin: FlatnessPlugin, strategy, weights) -> torch.Tensor:
    """Set the bowl's weights, run the plugin around a backward pass, return the gradient."""
    with torch.no_grad():
        strategy.model.w.copy_(torch.tensor(weights, dtype=torch.float64))
    strategy.model.w.grad = None
    strategy.loss = strategy.model.w.sum() * 0.0
    plugin.before_backward(strategy)
    strategy.loss.backward()
    plugin.after_backward(strategy)
    return strategy.model.w.grad.clone()


def test_penalty_gradient_reaches_parameters():
    plugin = FlatnessPlugin(strength=2.0, n_directions=2, n_snapshots=200, stiffness="hessian")
    strategy = _strategy(bowl_criterion)
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    plugin.after_training_exp(strategy)
    gradient = _train_one_step(plugin, strategy, [0.1, 0.2, 0.3, 0.4])
    # lambda * k_i * displacement along the kept axes 0 and 1, nothing along 2 and 3.
    expected = torch.tensor([2.0 * 50 * 0.1, 2.0 * 8 * 0.2, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(gradient, expected, rtol=1e-3, atol=1e-5)
    assert plugin.last_penalty == pytest.approx(0.5 * 2.0 * (50 * 0.01 + 8 * 0.04), rel=1e-3)


def test_capped_plugin_keeps_stiffest_directions():
    capped = FlatnessPlugin(n_directions=2, n_snapshots=200, stiffness="hessian", max_directions=3)
    stacked = FlatnessPlugin(n_directions=2, n_snapshots=200, stiffness="hessian")
    strategy = _strategy(bowl_criterion)
    for experience, stds in enumerate(([1.0, 0.5, 0.2, 0.1], [0.1, 0.2, 1.0, 0.5])):
        strategy.experience.current_experience = experience
        for plugin in (capped, stacked):
            _plant_snapshots(plugin, stds)
            plugin.after_training_exp(strategy)
    # Experience 0 keeps axes 0 and 1, experience 1 axes 2 and 3 (curvatures 50, 8, 2,
    # 0.5); three rows hold the stiffest three.
    assert stacked.penalty.n_rows == 4
    assert capped.penalty.n_rows == 3
    torch.testing.assert_close(
        capped.penalty.subspaces[0].stiffness,
        torch.tensor([50.0, 8.0, 2.0], dtype=torch.float64),
        rtol=1e-3,
        atol=1e-6,
    )
    restored = FlatnessPlugin(
        n_directions=2, n_snapshots=200, stiffness="hessian", max_directions=3
    )
    restored.load_state_dict(capped.state_dict())
    point = [0.3, -0.2, 0.1, 0.4]
    torch.testing.assert_close(
        _train_one_step(restored, strategy, point), _train_one_step(capped, strategy, point)
    )


def test_decoupled_update_proximal_factor():
    plugin = FlatnessPlugin(
        strength=2.0, n_directions=2, n_snapshots=200, stiffness="hessian", update="decoupled"
    )
    strategy = _strategy(bowl_criterion)
    _plant_snapshots(plugin, [1.0, 0.5, 0.2, 0.1])
    plugin.after_training_exp(strategy)
    strategy.optimizer = SimpleNamespace(param_groups=[{"lr": 0.01}])
    # The gradient is left to the data loss: before/after_backward add nothing.
    assert torch.count_nonzero(_train_one_step(plugin, strategy, [0.1, 0.2, 0.3, 0.4])) == 0
    plugin.after_update(strategy)
    # Along axis i the displacement becomes d / (1 + lr * lambda * k_i); axes 2, 3 stay.
    factors = [1 / (1 + 0.01 * 2.0 * 50), 1 / (1 + 0.01 * 2.0 * 8), 1.0, 1.0]
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) * torch.tensor(
        factors, dtype=torch.float64
    )
    torch.testing.assert_close(strategy.model.w.detach(), expected, rtol=1e-3, atol=1e-6)
    assert plugin.last_penalty == pytest.approx(0.5 * 2.0 * (50 * 0.01 + 8 * 0.04), rel=1e-3)


def test_sgd_probe_finds_noisy_axis():
    # Minibatch noise only along axis 0: a bowl whose minimum moves with the batch.
    curvatures = torch.tensor([4.0, 1.0, 0.25, 0.1], dtype=torch.float64)

    def noisy_bowl(output, targets):
        shift = torch.zeros(4, dtype=torch.float64)
        shift[0] = targets[0].to(torch.float64) - 0.5
        return LOSS0 + 0.5 * torch.sum(curvatures * (output[0] - shift) ** 2)

    generator = torch.Generator().manual_seed(0)
    batches = [
        [torch.zeros(1, 1), torch.randint(0, 2, (1,), generator=generator), torch.zeros(1).long()]
        for _ in range(50)
    ]
    strategy = _strategy(noisy_bowl)
    strategy.dataloader = batches
    plugin = FlatnessPlugin(
        n_directions=1,
        n_snapshots=40,
        stiffness="hessian",
        trajectory="sgd_probe",
        probe_lr=0.1,
        probe_interval=3,
    )
    plugin.after_training_exp(strategy)
    direction = plugin.penalty.subspaces[0].directions[0]
    assert abs(float(direction[0])) > 0.99
    assert plugin.consolidations[0].n_snapshots == 40
    # The probe's moves are undone: the weights are the anchor again.
    torch.testing.assert_close(strategy.model.w.detach(), torch.zeros(4, dtype=torch.float64))


def test_sgd_probe_divergence_names_probe_lr():
    plugin = FlatnessPlugin(n_directions=1, n_snapshots=10, trajectory="sgd_probe", probe_lr=1e3)
    strategy = _strategy(quartic_criterion)
    with torch.no_grad():
        strategy.model.w.fill_(1.0)
    with pytest.raises(ValueError, match="lower strategy.probe_lr=1000"):
        plugin.after_training_exp(strategy)
    torch.testing.assert_close(strategy.model.w.detach(), torch.ones(4, dtype=torch.float64))
