"""Config composition: defaults, root keys reaching the model, every group option."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_the_paper_model() -> None:
    cfg = _compose()
    assert cfg.model.name == "capsnet" and cfg.data.name == "mnist"
    assert cfg.model.router.iters == 3 and cfg.model.reconstruction is True
    assert cfg.profile_name == "paper" and cfg.trainer.max_steps == 300_000
    assert cfg.optim.lr == 0.001 and cfg.data.batch_size == 128 and cfg.loss.recon_weight == 0.0005


def test_root_keys_reach_the_model() -> None:
    cfg = _compose("routing.iters=7", "recon=false")
    assert cfg.model.router.iters == 7 and cfg.model.reconstruction is False


@pytest.mark.parametrize(
    "option",
    [
        "profile=smoke",
        "profile=demo",
        "profile=fast",
        "profile=paper",
        "trainer=cpu",
        "trainer=gpu",
        "trainer=ddp",
        "logger=csv",
        "logger=none",
        "model=baseline",
    ],
)
def test_group_options_compose(option: str) -> None:
    assert _compose(option) is not None
