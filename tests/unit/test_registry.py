"""Every conf/model × conf/data pair builds at tiny width and trains a step: a forward and a
backward pass through the objective the model declares, on random inputs of the dataset's
shape (no files needed: a DataModule knows its shapes before it reads anything).  A pair
that cannot work is refused when the model is built, with a message naming the input size.
A new model or dataset YAML is picked up by itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.run.builders import DATA_RECORD_KEYS
from capsnet.run.module import CapsNetModule

CONF = Path(__file__).resolve().parents[2] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "base")
TINY = {  # the narrowest widths each model family takes
    "capsnet": ["model.conv1_channels=8", "model.primary_types=2"],
    "baseline": ["model.conv_channels=[4,4,4]", "model.hidden=[8,8]"],
    "efficient_capsnet": ["model.conv_channels=[4,4,4,8]"],
    "matrix_capsules_em": [
        "model.conv_channels=4",
        "model.primary_types=2",
        "model.caps_types=[2,2]",
        "model.iterations=1",
    ],
}
# Pairs a model's fixed geometry cannot take: refused when built, naming the input size.
REFUSED = {
    ("efficient_capsnet", "cifar10"): "input_size 24 is too small",  # its fixed convolutions need 28×28 or more
    ("matrix_capsules_em", "multimnist"): "one label per image",  # the spread loss is single-label
}


def family(model: str) -> str:
    return next(name for name in TINY if model.startswith(name))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of two tiny images: data=image_folder learns its classes from the folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for k in range(2):
            Image.new("RGB", (9, 7), (40 * k, 100, 200)).save(root / name / f"{k}.png")
    return root


def compose_pair(model: str, data: str, image_root: Path) -> OmegaConf:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"data.root={image_root}", "data.image_size=28"] if data == "image_folder" else []
        return compose(config_name="config", overrides=[f"model={model}", f"data={data}", *TINY[family(model)], *extra])


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_a_step_on_every_dataset_shape(model: str, data: str, image_root: Path) -> None:
    cfg = compose_pair(model, data, image_root)
    data_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in DATA_RECORD_KEYS}
    datamodule = instantiate(data_kwargs, data_dir="/nonexistent", seed=0, _convert_="all")  # reads no file
    info = {k: getattr(datamodule, k) for k in ("image_size", "in_channels", "num_classes", "task")}
    build = lambda: CapsNetModule(  # noqa: E731
        model=OmegaConf.to_container(cfg.model, resolve=True),
        data=info,
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
    )
    if (model, data) in REFUSED:
        with pytest.raises(Exception, match=REFUSED[(model, data)]):
            build()
        return
    torch.manual_seed(0)
    module = build()
    batch = 2
    images = torch.rand(batch, info["in_channels"], info["image_size"], info["image_size"])
    if info["task"] == "multi":
        labels = torch.tensor([[0, 1], [2, 3]])
        parts = torch.rand(batch, 2, info["in_channels"], info["image_size"], info["image_size"])
    else:
        labels, parts = torch.arange(batch) % info["num_classes"], None
    scores, loss_parts = module.objective(module.net, images, labels, parts, training=True, step=0)
    loss = sum(loss_parts.values())
    assert scores.shape == (batch, info["num_classes"]) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.net.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the network"
