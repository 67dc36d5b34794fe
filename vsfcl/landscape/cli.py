"""The ``vsfcl-landscape`` command: the Hydra entry point of the landscape analysis.

Composition and ``instantiate`` happen here only; the pipeline below receives typed
settings and an optimizer factory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import vsfcl
from vsfcl.data.mnist import MnistUnavailableError
from vsfcl.landscape.exploration import ExplorationCriterion
from vsfcl.landscape.pipeline import (
    AnalysisSettings,
    LandscapeSettings,
    TrainingSettings,
    WindowSettings,
    run_landscape,
)
from vsfcl.landscape.theory import settings_from_mapping

log = logging.getLogger(__name__)


def config_dir() -> str:
    """Return the absolute path of the Hydra config folder.

    An installed wheel ships the configs as ``vsfcl/conf``; a source checkout keeps
    them in ``conf/`` next to the package folder.
    """
    package_dir = Path(vsfcl.__file__).resolve().parent
    installed = package_dir / "conf"
    if installed.is_dir():
        return str(installed)
    return str(package_dir.parent / "conf")


def settings_from_config(cfg: DictConfig) -> LandscapeSettings:
    """Convert the composed config into typed settings."""
    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    parameters = plain["trajectory"]["parameters"]
    if not isinstance(parameters, str):
        parameters = tuple(parameters)
    analysis = dict(plain["analysis"])
    analysis["trajectory_planes"] = tuple(tuple(pair) for pair in analysis["trajectory_planes"])
    theory_options = dict(plain["theory"])
    theory, langevin = None, None
    if theory_options.pop("enabled"):
        theory, langevin = settings_from_mapping(theory_options)
    return LandscapeSettings(
        training=TrainingSettings(
            seed=plain["seed"],
            device=plain["device"],
            data_root=plain["data_root"],
            train_subset=plain["train_subset"],
            hidden_sizes=tuple(plain["model"]["hidden_sizes"]),
            activation=plain["model"]["activation"],
            batch_size=plain["batch_size"],
        ),
        exploration=ExplorationCriterion(**plain["exploration"]),
        window=WindowSettings(
            window_epochs=plain["window_epochs"],
            snapshot_interval=plain["snapshot_interval"],
            parameters=parameters,
            snapshot_dtype=plain["trajectory"]["dtype"],
            coordinate_stride=plain["trajectory"]["coordinate_stride"],
            max_buffer_gib=plain["trajectory"]["max_buffer_gib"],
        ),
        analysis=AnalysisSettings(**analysis),
        optimizer_name=str(plain["optimizer"]["_target_"]),
        learning_rate=float(plain["optimizer"]["lr"]),
        theory=theory,
        langevin=langevin,
    )


@hydra.main(config_path=config_dir(), config_name="landscape", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the landscape analysis with the composed config."""
    settings = settings_from_config(cfg)
    if cfg.num_threads is not None:
        if int(cfg.num_threads) < 1:
            raise ValueError(
                f"num_threads={cfg.num_threads} must be at least 1, or null for PyTorch's default"
            )
        torch.set_num_threads(int(cfg.num_threads))
    make_optimizer = instantiate(cfg.optimizer)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    optimizer_yaml = OmegaConf.to_yaml(cfg.optimizer, resolve=True).strip()
    log.info("Landscape run in %s with optimizer %s", output_dir, optimizer_yaml)
    try:
        run_landscape(settings, make_optimizer, output_dir)
    except (ValueError, MnistUnavailableError) as error:
        # Invalid settings and degenerate landscapes (for example L_0 = 0, where the
        # e*L_0 level is undefined) end with one message; summary.json is not written.
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
