"""Every config group composes, and bad values are rejected with messages that name them."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vsfcl.strategies import STRATEGIES, build_method_plugin
from vsfcl.train import config_dir, resolve_device

GROUPS = {
    "benchmark": ["split_mnist", "permuted_mnist"],
    "strategy": list(STRATEGIES),
    "model": ["mlp"],
    "optimizer": ["adam", "sgd"],
}


def _compose(overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_config_groups_match_files():
    for group, options in GROUPS.items():
        files = sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))
        assert files == sorted(options), group


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert cfg[group] is not None
    if group == "strategy":
        options = dict(cfg.strategy)
        name = options.pop("name")
        assert name == option
        build_method_plugin(name, options)
    if group == "optimizer":
        import torch

        optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
        assert optimizer.defaults["lr"] == cfg.optimizer.lr


def test_overrides_from_the_readme_compose():
    cfg = _compose(
        ["benchmark=permuted_mnist", "strategy=ewc", "strategy.ewc_lambda=100", "seed=1"]
    )
    assert cfg.benchmark.name == "permuted_mnist"
    assert cfg.strategy.ewc_lambda == 100
    assert cfg.seed == 1


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("ewc", {"ewc_lambda": -1.0}, r"strategy.ewc_lambda=-1.0 is out of range"),
        ("ewc", {"ewc_lambda": "big"}, r"strategy.ewc_lambda='big' is invalid"),
        (
            "online_ewc",
            {"ewc_lambda": 1.0, "decay_factor": 2.0},
            r"decay_factor=2.0 is out of range",
        ),
        ("si", {}, r"strategy 'si' is unknown"),
    ],
)
def test_bad_strategy_values_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_method_plugin(name, options)


def test_flatness_rejects_more_directions_than_snapshots():
    options = dict(_compose(["strategy=flatness"]).strategy)
    options.pop("name")
    options["n_directions"] = 50
    with pytest.raises(ValueError, match="n_directions=50 is out of range"):
        build_method_plugin("flatness", options)


def test_cuda_without_gpu_is_an_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda was requested but no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="device='tpu' is invalid"):
        resolve_device("tpu")


@pytest.mark.parametrize("name", ["ewc", "online_ewc"])
def test_avalanche_ewc_plugin_selectable(name):
    from avalanche.training.plugins import EWCPlugin as AvalancheEWCPlugin

    options = dict(_compose([f"strategy={name}", "strategy.implementation=avalanche"]).strategy)
    options.pop("name")
    plugin = build_method_plugin(name, options)
    assert isinstance(plugin, AvalancheEWCPlugin)
    assert plugin.mode == ("online" if name == "online_ewc" else "separate")
    options["implementation"] = "other"
    with pytest.raises(ValueError, match="strategy.implementation='other' is invalid"):
        build_method_plugin(name, options)
