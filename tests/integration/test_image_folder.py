"""Your own images (data=image_folder) and src/predict.py, on image files the tests write
with PIL: classes from folders, channels and sizes, the seeded splits, bad files named and
skipped, bad folders refused, a CLI training run and predictions from its checkpoint."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image, ImageDraw

from capsnet.data.base import DataError
from capsnet.data.image_folder import ImageFolderDataModule, InputRecipe, load_image
from capsnet.run.builders import build_datamodule
from capsnet.run.evaluation import CheckpointError, load_checkpoint
from capsnet.run.module import CapsNetModule
from capsnet.run.prediction import network_view, predict
from capsnet.run.validation import ConfigError, validate_config
from conftest import CONF, run_cli

CLASSES = {"triangle": (40, 90, 255), "circle": (255, 40, 40), "square": (40, 220, 40)}  # written unsorted


def write_images(root: Path, per_class: int = 8, seed: int = 0) -> dict[str, list[Path]]:
    """Coloured shapes on noise at odd sizes (20×17 RGB), plus a grey PNG, a JPEG, an RGBA
    PNG, one corrupt file, a text file and a hidden folder, in root/<class>/."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for name, colour in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True)
        written[name] = []
        for i in range(per_class):
            noise = rng.integers(0, 70, size=(17, 20, 3), dtype=np.uint8)
            image = Image.fromarray(noise, "RGB")
            box = (3 + i % 3, 2, 15 + i % 3, 14)
            draw = ImageDraw.Draw(image)
            if name == "circle":
                draw.ellipse(box, fill=colour)
            elif name == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
            path = folder / f"{name}_{i}.png"
            image.save(path)
            written[name].append(path)
    extra = {
        "circle": ("grey.png", Image.fromarray(rng.integers(0, 255, size=(25, 15), dtype=np.uint8), "L")),
        "square": ("photo.jpg", Image.new("RGB", (31, 23), CLASSES["square"])),
        "triangle": ("clear.png", Image.new("RGBA", (18, 18), (255, 255, 255, 0))),
    }
    for name, (filename, image) in extra.items():
        image.save(root / name / filename)
        written[name].append(root / name / filename)
    whole = root / "square" / "broken.png"
    Image.fromarray(rng.integers(0, 255, size=(17, 20, 3), dtype=np.uint8)).save(whole)
    whole.write_bytes(whole.read_bytes()[:300])  # a truncated PNG: its header reads, its pixels do not
    (root / "square" / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (5, 5)).save(root / ".ipynb_checkpoints" / "x.png")
    return written


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    settings = {"data_dir": "unused", "val_size": 4, "image_size": 12, **kwargs}
    return ImageFolderDataModule(root=str(root), **settings)


def test_classes_from_folders_channels_sizes_and_a_corrupt_file(tmp_path: Path, caplog) -> None:
    written = write_images(tmp_path / "images")
    readable = {path for paths in written.values() for path in paths}
    with caplog.at_level(logging.WARNING, logger="capsnet.data.image_folder"):
        rgb = module(tmp_path / "images")
        assert rgb.num_classes == 3 and rgb.in_channels == 3 and rgb.image_size == 12  # before any image is read
        rgb.prepare_data()
        rgb.setup()
    assert rgb.class_names == ["circle", "square", "triangle"]  # sorted folder names; the hidden one is no class
    # the corrupt file is named with its error in a warning, and left out; the text file is ignored
    ((path, error),) = rgb.skipped
    assert path == tmp_path / "images" / "square" / "broken.png" and error.startswith("OSError: ")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{path}: {error}" in warning
    files = rgb.split_files["train"] + rgb.split_files["test"]
    assert set(files) == readable and len(files) == len(readable) == 27
    for split, (images, labels) in (("train", rgb.full_training_split()), ("test", rgb.test_set)):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 12, 12)
        assert labels.tolist() == [rgb.class_names.index(p.parent.name) for p in rgb.split_files[split]]
    assert len(rgb.train_set[1]) + len(rgb.val_set[1]) + len(rgb.test_set[1]) == 27
    # each decoded image is load_image of its file; the grey PNG becomes three equal channels
    train_images = rgb.full_training_split()[0]
    for index, path in enumerate(rgb.split_files["train"]):
        assert torch.equal(train_images[index], load_image(path, 3, 12, "resize"))
    grey = load_image(tmp_path / "images" / "circle" / "grey.png", 3, 12, "resize")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]) and grey.float().std() > 10

    one = module(tmp_path / "images", channels=1, image_size=20)
    one.prepare_data()
    assert one.in_channels == 1 and one.read(train=True)[0].shape[1:] == (1, 20, 20)
    red = tmp_path / "red.png"
    Image.new("RGB", (20, 17), (255, 0, 0)).save(red)
    assert load_image(red, 1, 4, "resize").unique().tolist() == [76]  # PIL's luma: 255 * 299 / 1000
    assert load_image(red, 3, 4, "resize")[:, 0, 0].tolist() == [255, 0, 0]
    assert load_image(tmp_path / "images" / "triangle" / "clear.png", 3, 6, "resize").max() == 0  # transparent: black
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(deep)  # 16-bit grey: scaled, not clipped to 255
    assert load_image(deep, 1, 6, "resize").unique().tolist() == [255]


def test_resize_modes(tmp_path: Path) -> None:
    halves = np.zeros((10, 20, 3), dtype=np.uint8)
    halves[:, :10, 0], halves[:, 10:, 2] = 255, 255  # left red, right blue
    Image.fromarray(halves).save(tmp_path / "halves.png")
    squashed = load_image(tmp_path / "halves.png", 3, 8, "resize")
    assert squashed.shape == (3, 8, 8) and squashed[0, :, 0].tolist() == [255] * 8 and squashed[2, :, 7].min() == 255
    band = np.zeros((20, 60, 3), dtype=np.uint8)
    band[:, :, 0] = 255
    band[:, 15:45] = (0, 255, 0)  # a green middle between red sides
    Image.fromarray(band).save(tmp_path / "band.png")
    cropped = load_image(tmp_path / "band.png", 3, 10, "center_crop")
    assert cropped.shape == (3, 10, 10) and cropped[1].min() == 255 and cropped[0].max() == 0 and cropped[2].max() == 0
    Image.new("RGB", (20, 10), (255, 255, 255)).save(tmp_path / "wide.png")
    padded = load_image(tmp_path / "wide.png", 1, 10, "pad")[0]
    assert padded[2:7].min() == 255 and padded[:2].max() == 0 and padded[7:].max() == 0  # 10×5, centred rows 2..6


def test_seeded_splits_are_stable_and_partition_the_files(tmp_path: Path) -> None:
    write_images(tmp_path / "images")
    first, again = module(tmp_path / "images", test_size=0.25), module(tmp_path / "images", test_size=0.25, seed=7)
    for m in (first, again):
        m.setup()
    assert first.split_files["test"] == again.split_files["test"] and len(first.split_files["test"]) == 7  # 0.25 × 28
    assert torch.equal(first.val_set[0], again.val_set[0]) and torch.equal(first.train_set[1], again.train_set[1])
    assert not set(first.split_files["test"]) & set(first.split_files["train"])
    other = module(tmp_path / "images", test_size=0.25, split_seed=1)
    other.setup()
    assert set(other.split_files["test"]) != set(first.split_files["test"])
    (tmp_path / "images" / "square" / "broken.png").unlink()
    counted = module(tmp_path / "images", test_size=3)
    counted.prepare_data()
    assert len(counted.split_files["test"]) == 3 and len(counted.split_files["train"]) == 24  # test_size: a count


def test_a_separate_test_folder(tmp_path: Path) -> None:
    write_images(tmp_path / "images")
    write_images(tmp_path / "test", per_class=2, seed=1)
    separate = module(tmp_path / "images", test_root=str(tmp_path / "test"))
    separate.setup()
    assert len(separate.train_set[1]) + len(separate.val_set[1]) == 27  # all of root trains
    assert all(p.is_relative_to(tmp_path / "test") for p in separate.split_files["test"])
    assert separate.test_set[1].tolist() == [
        separate.class_names.index(p.parent.name) for p in separate.split_files["test"]
    ]
    (tmp_path / "test" / "rabbit").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "rabbit" / "1.png")
    with pytest.raises(DataError, match=r"data\.test_root: .*test/rabbit is not a class of data\.root"):
        module(tmp_path / "images", test_root=str(tmp_path / "test")).prepare_data()


def test_bad_folders_and_settings_are_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_images(root)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=rf"class folder {root / 'empty'} holds no image file"):
        module(root).prepare_data()
    (root / "empty" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"class folder {root / 'empty'} holds no readable image"):
        module(root).prepare_data()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=rf"data\.root: {tmp_path / 'nothing'} has no class folders"):
        module(tmp_path / "nothing").prepare_data()
    with pytest.raises(DataError, match=r"data\.root: no such folder: .*/missing"):
        _ = module(tmp_path / "missing").num_classes
    for key, value in (("channels", 2), ("resize_mode", "stretch"), ("test_size", 1.5), ("load_size", 8)):
        with pytest.raises(DataError, match=rf"invalid config value data\.{key}="):
            module(root, **{key: value})


def test_training_views_and_the_state_a_checkpoint_keeps(tmp_path: Path) -> None:
    write_images(tmp_path / "images")
    augmented = module(tmp_path / "images", load_size=16, train_crop="random", flip=True)
    augmented.setup()
    stored = augmented.train_set[0][:16]
    assert stored.shape[-1] == 16 and augmented.place(stored).shape == (16, 3, 12, 12)
    assert torch.equal(augmented.place(stored), stored[..., 2:14, 2:14].float() / 255)  # the test view: the centre
    views = [augmented.train_view(stored, torch.arange(16), epoch) for epoch in (0, 1)]
    assert views[0].shape == (16, 3, 12, 12) and not torch.equal(views[0], views[1])  # drawn per epoch
    assert torch.equal(views[0], augmented.train_view(stored, torch.arange(16), 0))  # a pure function of its keys
    state = augmented.state_dict()
    assert state["class_names"] == ["circle", "square", "triangle"]
    assert InputRecipe(**{k: state[k] for k in ("channels", "image_size", "load_size", "resize_mode", "standardize")})
    assert (state["image_size"], state["load_size"]) == (12, 16)
    augmented.load_state_dict(state)  # the same classes: resumes
    with pytest.raises(DataError, match=r"trained on \['cat', 'dog', 'eel'\]"):
        augmented.load_state_dict({**state, "class_names": ["cat", "dog", "eel"]})


def test_the_config_keys_are_the_class_arguments(make_cfg, tmp_path: Path) -> None:
    write_images(tmp_path / "images")
    cfg = make_cfg("data=image_folder", f"data.root={tmp_path / 'images'}", "data.image_size=24")
    validate_config(cfg)
    datamodule = build_datamodule(cfg)
    assert (datamodule.num_classes, datamodule.in_channels, datamodule.image_size) == (3, 3, 24)
    assert datamodule.title == f"your images: {tmp_path / 'images'}"
    with pytest.raises(ConfigError, match=r"data\.colour"):
        validate_config(make_cfg("data=image_folder", f"data.root={tmp_path}", "+data.colour=red"))


def _predict_cfg(tmp_path: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "predict")
    return cfg


@pytest.mark.slow
def test_train_on_a_folder_then_predict(tmp_path: Path) -> None:
    """The CLI trains on the folder; predict.py reads the checkpoint's recipe and classes,
    names the corrupt file, and prepares each image exactly as the test split was."""
    root = tmp_path / "images"
    write_images(root)
    run_dir = tmp_path / "run"
    trained = run_cli(
        "train.py",
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=28",
        "model.conv1_channels=16",
        "model.primary_types=4",
        "profile=smoke",
        "trainer=cpu",
        "logger=none",
        "data.batch_size=8",
        "data.val_size=4",
        "figures=false",
        f"hydra.run.dir={run_dir}",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    datamodule = ImageFolderDataModule(data_dir="unused", root=str(root), image_size=28, val_size=4)
    datamodule.setup()
    assert record["status"] == "completed" and record["data"] == "image_folder"
    assert record["steps"] == min(4, len(datamodule.train_set[1]) // 8) and record["test_examples"] == len(
        datamodule.test_set[1]
    )
    best = run_dir / "checkpoints" / "best.ckpt"

    out = tmp_path / "predicted"
    result = run_cli("predict.py", f"ckpt_path={best}", f"inputs={root}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"{root / 'square' / 'broken.png'}: OSError" in output  # named, with its error
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{root}/") and "lengths:" in line]
    assert len(lines) == 27 and not any("broken.png" in line for line in lines)
    assert all(line.count("=") == 3 and any(f": {name} (class " in line for name in CLASSES) for line in lines)
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 27 and list(rows[0])[:6] == [
        "path",
        "predicted_class",
        "predicted_index",
        "length_circle",
        "length_square",
        "length_triangle",
    ]
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == sorted(
        Path(r["reconstruction"]).name for r in rows
    )
    assert Image.open(out / rows[0]["reconstruction"]).size == (28, 28)

    # the lengths predict printed are the model's on the DataModule's own test view of those files
    model = load_checkpoint(best, {}).eval()
    with torch.no_grad():
        expected = model(datamodule.place(datamodule.test_set[0]))
    by_path = {r["path"]: r for r in rows}
    for path, lengths in zip(datamodule.split_files["test"], expected, strict=True):
        row = by_path[str(path)]
        assert [float(row[f"length_{c}"]) for c in ("circle", "square", "triangle")] == pytest.approx(
            lengths.tolist(), abs=1e-5
        )
        assert row["predicted_class"] == datamodule.class_names[int(lengths.argmax())]
    assert torch.equal(
        network_view(datamodule.test_set[0], InputRecipe(3, 28, 28, "resize", False)),
        datamodule.place(datamodule.test_set[0]),
    )

    nothing = run_cli("predict.py", f"ckpt_path={best}", f"inputs={tmp_path}/none/*.png", f"hydra.run.dir={out}2")
    assert nothing.returncode == 2 and "invalid config value inputs=" in nothing.stderr
    assert not (tmp_path / "predicted2").exists()  # a refusal leaves no output dir
    with pytest.raises(CheckpointError, match=r"ckpt_path: no such file .*nope\.ckpt"):
        predict(_predict_cfg(tmp_path, f"ckpt_path={tmp_path}/nope.ckpt", f"inputs={root}"))
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("text")
    with pytest.raises(ConfigError, match=r"inputs=.*holds no image file"):
        predict(_predict_cfg(tmp_path, f"ckpt_path={best}", f"inputs={tmp_path / 'no_images'}"))


def test_predict_with_a_checkpoint_of_another_dataset(make_cfg, tmp_path: Path, capsys) -> None:
    """A checkpoint without an image folder's recipe (here: an MNIST-shaped CapsNet): images are
    converted to its channels and squashed to its size, classes shown as indices; a model of
    2-channel inputs (smallNORB) is refused, naming the checkpoint."""
    cfg = make_cfg("model.conv1_channels=16", "model.primary_types=4")
    params = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {"image_size": 28, "in_channels": 1, "num_classes": 10, "task": "single"},
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
    }
    mnist = CapsNetModule(**params)
    path = tmp_path / "mnist.ckpt"
    torch.save(
        {"hyper_parameters": params, "state_dict": mnist.state_dict(), "capsnet_run_signature": {"data.name": "mnist"}},
        path,
    )
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.png")
    result = predict(_predict_cfg(tmp_path, f"ckpt_path={path}", f"inputs={tmp_path}/*.png", "reconstructions=false"))
    printed = capsys.readouterr().out
    assert "no class names in the checkpoint" in printed and "grey, squashed to 28×28" in printed
    assert "approximated: trained on mnist" in printed
    (row,) = result["predictions"]
    image = torch.full((1, 1, 28, 28), round(200 * 0.299 + 30 * 0.587 + 30 * 0.114) / 255)
    with torch.no_grad():
        expected = mnist.eval()(image)[0]
    assert row["scores"] == pytest.approx(expected.tolist(), abs=1e-5) and row["predicted_class"] == str(
        int(expected.argmax())
    )
    assert row["reconstruction"] == "" and result["score_kind"] == "length"
    stereo = {**params, "data": {**params["data"], "in_channels": 2}}
    torch.save({"hyper_parameters": stereo, "state_dict": CapsNetModule(**stereo).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"takes 2-channel inputs"):
        predict(_predict_cfg(tmp_path, f"ckpt_path={path}", f"inputs={tmp_path}/photo.png"))
