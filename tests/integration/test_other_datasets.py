"""§7: CIFAR-10, SVHN and smallNORB readers on files written in their real formats, the
paper's crops, the §7 models' parameter counts, smoke training, ensembles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from capsnet.data.cifar10 import CIFAR10DataModule
from capsnet.data.mnist import DataError
from capsnet.data.smallnorb import SmallNORBDataModule
from capsnet.data.svhn import SVHNDataModule
from capsnet.data.transforms import center_crop, random_crop, random_flip, standardize
from capsnet.nn.models import count_parameters
from capsnet.run.builders import build_datamodule
from capsnet.run.evaluation import evaluate
from capsnet.run.module import build_model
from capsnet.run.training import run
from dataset_files import write_cifar10, write_smallnorb, write_svhn

SMALL = ["data.batch_size=8", "data.eval_batch_size=16", "trainer.limit_train_batches=2", "figures=true"]


def _rows(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_cifar10_reader_split_and_checksums(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, per_class=2)
    module = CIFAR10DataModule(data_dir=str(tmp_path), crop_size=24, val_size=20, verify_checksums=False)
    module.prepare_data()
    module.setup()
    (train, train_labels), (val, val_labels) = module.train_set, module.val_set
    test, test_labels = module.test_set
    assert train.shape == (80, 3, 32, 32) and val.shape == (20, 3, 32, 32) and train.dtype == torch.uint8
    assert test.shape == (20, 3, 32, 32) and set(test_labels.tolist()) == set(range(10))
    # the held-out split and the training set partition the five training batches, pixels exact
    everything = {
        img.tobytes(): int(lab)
        for name, (imgs, labs) in written.items()
        if name != "test_batch"
        for img, lab in zip(imgs, labs, strict=True)
    }
    assert _rows(train) | _rows(val) == set(everything) and not _rows(train) & _rows(val)
    assert all(everything[img.numpy().tobytes()] == int(lab) for img, lab in zip(train, train_labels, strict=True))
    again = CIFAR10DataModule(data_dir=str(tmp_path), crop_size=24, val_size=20, verify_checksums=False, seed=5)
    again.setup()
    assert torch.equal(again.val_set[0], val) and torch.equal(
        again.val_set[1], val_labels
    )  # the run seed does not move it

    checked = CIFAR10DataModule(data_dir=str(tmp_path), crop_size=24, val_size=20)
    with pytest.raises(DataError, match=r"data_batch_1 has md5 .* expected c99cafc152244af753f735de768cd75f"):
        checked.prepare_data()  # our files are not the published ones
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"file missing: .*test_batch\. CIFAR-10 .*cifar-10-python\.tar\.gz"):
        CIFAR10DataModule(data_dir=str(tmp_path), crop_size=24, verify_checksums=False).prepare_data()


def test_download_uses_torchvision_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        write_cifar10(Path(root), per_class=1)

    monkeypatch.setattr(
        "torchvision.datasets.CIFAR10",
        type(
            "Fake",
            (),
            {
                "__new__": lambda cls, **kw: fake_cifar10(**kw),
                "train_list": __import__("torchvision").datasets.CIFAR10.train_list,
                "test_list": __import__("torchvision").datasets.CIFAR10.test_list,
            },
        ),
    )
    with pytest.raises(DataError, match="file missing"):
        CIFAR10DataModule(data_dir=str(tmp_path), crop_size=24, verify_checksums=False).prepare_data()
    assert calls == []
    CIFAR10DataModule(data_dir=str(tmp_path), crop_size=24, verify_checksums=False, download=True).prepare_data()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    with pytest.raises(DataError, match="no download is available for SmallNORBDataModule"):
        SmallNORBDataModule(data_dir=str(tmp_path), crop_size=32, download=True).prepare_data()


def test_svhn_reader_layout_and_the_zero_label(tmp_path: Path) -> None:
    written = write_svhn(tmp_path, train=60, test=20)
    module = SVHNDataModule(
        data_dir=str(tmp_path), crop_size=32, train_crop="center", val_size=10, verify_checksums=False
    )
    module.prepare_data()
    images, labels = module.read(train=False)
    x, y = written["test_32x32.mat"]
    assert images.shape == (20, 3, 32, 32)
    assert torch.equal(images[7], torch.from_numpy(x[:, :, :, 7]).permute(2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    assert labels.tolist() == [int(v) % 10 for v in y[:, 0]] and labels.min() == 0 and labels.max() == 9
    with pytest.raises(DataError, match=r"train_32x32\.mat has md5"):
        SVHNDataModule(data_dir=str(tmp_path), crop_size=32).prepare_data()


def test_smallnorb_reader_resize_channels_and_corrupt_files(tmp_path: Path) -> None:
    written = write_smallnorb(tmp_path, train=40, test=20)
    dat, cat, _ = written["smallnorb-5x01235x9x18x6x2x96x96-testing"]
    stereo = SmallNORBDataModule(data_dir=str(tmp_path), crop_size=32, val_size=10, verify_checksums=False)
    stereo.prepare_data()
    images, labels = stereo.read(train=False)
    assert images.shape == (20, 2, 48, 48) and labels.tolist() == cat.tolist() and labels.max() == 4
    # 96 -> 48 by area: each pixel the mean of a 2x2 block, rounded
    block = dat[3].astype(np.float64).reshape(2, 48, 2, 48, 2).mean(axis=(2, 4))
    assert np.array_equal(images[3].numpy(), np.round(block).astype(np.uint8))
    left, _ = SmallNORBDataModule(data_dir=str(tmp_path), crop_size=32, channels=1, verify_checksums=False).read(False)
    assert left.shape == (20, 1, 48, 48) and torch.equal(left[:, 0], images[:, 0])
    assert stereo.place(images[:2]).shape == (2, 2, 32, 32)  # the central patch at test
    assert torch.equal(stereo.place(images[:1])[0] * 255, images[0, :, 8:40, 8:40].float())

    with pytest.raises(DataError, match=r"expected 0x1e3d4c55, \(24300, 2, 96, 96\)"):
        SmallNORBDataModule(data_dir=str(tmp_path), crop_size=32).prepare_data()  # not the published size
    path = tmp_path / "smallNORB" / "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"testing-cat\.mat has magic"):
        stereo.prepare_data()


def test_crops_flips_and_standardisation() -> None:
    images = torch.rand(64, 3, 32, 32)
    idx = torch.arange(64)
    cropped = random_crop(images, 24, 0, 1, idx)
    assert cropped.shape == (64, 3, 24, 24)
    offsets = set()
    for b in range(64):  # each crop is a 24x24 window of its own image
        found = [
            (top, left)
            for top in range(9)
            for left in range(9)
            if torch.equal(cropped[b], images[b, :, top : top + 24, left : left + 24])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 20  # windows vary per image
    assert torch.equal(random_crop(images, 24, 0, 1, idx), cropped)  # a pure function of (seed, epoch, index)
    assert not torch.equal(random_crop(images, 24, 0, 2, idx), cropped)  # and of the epoch
    assert torch.equal(center_crop(images, 24), images[..., 4:28, 4:28])
    flipped = random_flip(images, 0, 1, idx)
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images, strict=True)]
    unchanged = [torch.equal(f, i) for f, i in zip(flipped, images, strict=True)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True)) and 10 < sum(mirrored) < 54
    normal = standardize(images)
    assert torch.allclose(normal.mean(dim=(1, 2, 3)), torch.zeros(64), atol=1e-5)
    assert torch.allclose(normal.std(dim=(1, 2, 3), unbiased=False), torch.ones(64), atol=1e-4)
    assert torch.equal(standardize(torch.full((1, 3, 4, 4), 0.5)), torch.zeros(1, 3, 4, 4))  # flat: no 0/0


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _decoder(classes: int, dim: int, pixels: int) -> int:
    return (classes * dim * 512 + 512) + (512 * 1024 + 1024) + (1024 * pixels + pixels)


@pytest.mark.parametrize(
    ("model", "size", "channels", "classes", "expected"),
    [
        # conv1 9x9; primary 9x9/2 with types x dim channels; W: capsules x in_dim x classes x out_dim; decoder
        (
            "capsnet_cifar10",
            24,
            3,
            10,
            _conv(3, 256, 9) + _conv(256, 512, 9) + 4 * 4 * 64 * 8 * 10 * 16 + _decoder(10, 16, 24 * 24 * 3),
        ),
        (
            "capsnet_svhn",
            32,
            3,
            10,
            _conv(3, 64, 9) + _conv(64, 96, 9) + 8 * 8 * 16 * 6 * 10 * 8 + _decoder(10, 8, 32 * 32 * 3),
        ),
        (
            "capsnet",
            32,
            2,
            5,
            _conv(2, 256, 9) + _conv(256, 256, 9) + 8 * 8 * 32 * 8 * 5 * 16 + _decoder(5, 16, 32 * 32 * 2),
        ),
    ],
)
def test_section7_parameter_counts(make_cfg, model: str, size: int, channels: int, classes: int, expected: int) -> None:
    cfg = make_cfg(f"model={model}")
    net = build_model(dict(cfg.model), image_size=size, in_channels=channels, num_classes=classes, task="single")
    assert count_parameters(net) == expected
    print(f"{model} on {size}x{size}x{channels}, {classes} classes: {expected:,} parameters")


@pytest.mark.parametrize(
    ("data", "model", "writer", "shape"),
    [
        ("cifar10", "capsnet_cifar10", write_cifar10, (3, 24, 24)),
        ("svhn", "capsnet_svhn", write_svhn, (3, 32, 32)),
        ("smallnorb", "capsnet", write_smallnorb, (2, 32, 32)),
    ],
)
def test_each_dataset_trains_a_few_steps(make_cfg, tmp_path: Path, data: str, model: str, writer, shape) -> None:
    writer(tmp_path / "data")
    cfg = make_cfg(
        f"data={data}",
        f"model={model}",
        "data.verify_checksums=false",
        "data.val_size=10",
        "data.train_subset=null",
        "data.val_subset=null",
        "data.test_subset=null",
        *SMALL,
        *(["routing.leaky=true"] if data == "cifar10" else []),
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.place(datamodule.test_set[0][:2]).shape == (2, *shape)
    record = run(cfg)
    assert record["status"] == "completed", record.get("error")
    assert record["steps"] == 2 and 0 <= record["test_error"] <= 1
    figures = Path(cfg.paths.output_dir) / "figures"
    assert {"reconstructions.png", "samples_test_images.png", "dimension_perturbation.png"} <= {
        p.name for p in figures.glob("*.png")
    }


def test_an_ensemble_averages_capsule_lengths(make_cfg, make_eval_cfg, tmp_path: Path) -> None:
    """Two members trained a few steps; the ensemble's error is recomputed here from the
    members' own test-set scores."""
    tiny = [
        "trainer.limit_train_batches=3",
        "data.batch_size=16",
        "data.val_subset=16",
        "data.test_subset=64",
        "figures=false",
    ]
    for seed in (0, 1):
        assert run(make_cfg(*tiny, f"seed={seed}", output_dir=tmp_path / f"m{seed}"))["status"] == "completed"
    cfg = make_eval_cfg(
        tmp_path / "m*" / "checkpoints" / "best.ckpt",
        "data.test_subset=64",
        "figures=false",
        output_dir=tmp_path / "ensemble",
    )
    record = evaluate(cfg)
    assert record["kind"] == "ensemble" and record["ensemble_size"] == 2

    datamodule = build_datamodule(cfg)
    datamodule.setup()
    images, labels = datamodule.place(datamodule.test_set[0]), datamodule.test_set[1]
    from capsnet.run.evaluation import load_checkpoint

    scores = []
    for path in record["checkpoints"]:
        member = load_checkpoint(path, {"image_size": 28, "in_channels": 1, "num_classes": 10, "task": "single"}).eval()
        with torch.no_grad():
            scores.append(member(images))
    member_errors = [float((s.argmax(1) != labels).float().mean()) for s in scores]
    ensemble_error = float((torch.stack(scores).mean(0).argmax(1) != labels).float().mean())
    assert record["member_test_errors"] == pytest.approx(member_errors)
    assert record["test_error"] == pytest.approx(ensemble_error)
    assert json.loads((tmp_path / "ensemble" / "metrics.json").read_text())["test_error"] == pytest.approx(
        ensemble_error
    )


def test_the_cifar10_ensemble_takes_completed_runs_of_one_configuration(
    make_cfg, make_eval_cfg, tmp_path: Path
) -> None:
    """§7's headline number: the ensemble reads each member's run record; runs that failed or
    never finished are left out and listed, runs of another configuration are refused until
    the set is narrowed, and the record carries the members' profile and configuration, so
    ``python -m capsnet.reporting.table --profile`` shows it beside its members."""
    from capsnet.reporting.table import main as table_main
    from capsnet.run.evaluation import CheckpointError
    from capsnet.run.signature import configuration

    write_cifar10(tmp_path / "data", per_class=3)
    runs = tmp_path / "multirun" / "cifar10"
    small = [
        "data=cifar10",
        "model=capsnet_cifar10",
        "routing.leaky=true",
        "model.conv1_channels=16",
        "model.primary_types=4",
        "data.verify_checksums=false",
        "data.val_size=20",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "data.train_subset=null",
        "data.val_subset=null",
        "data.test_subset=null",
        "trainer.limit_train_batches=2",
        "figures=false",
    ]

    def compose(name: str, *extra: str):
        cfg = make_cfg(*small, *extra, output_dir=runs / name)
        with open_dict(cfg):
            cfg.paths.data_dir = str(tmp_path / "data")
        return cfg

    for seed in (0, 1):
        assert run(compose(f"profile=smoke,seed={seed}", f"seed={seed}"))["status"] == "completed"
    # failed in its second epoch: a best.ckpt from the first, and no result
    crash = ["trainer.max_epochs=2", "+callbacks.crash._target_=apps.probes.FailAt", "+callbacks.crash.step=3"]
    assert run(compose("profile=smoke,seed=2", "seed=2", *crash))["status"] == "failed"
    # killed while training: checkpoints, and no run record yet
    shutil.copytree(runs / "profile=smoke,seed=0" / "checkpoints", runs / "profile=smoke,seed=3" / "checkpoints")
    # completed, of another configuration
    assert run(compose("optim.lr=0.002,profile=smoke,seed=4", "seed=4", "optim.lr=0.002"))["status"] == "completed"
    assert len(list(runs.glob("*/checkpoints/best.ckpt"))) == 5

    def compose_eval(name: str, ckpt_path: Path):
        eval_data = ["data=cifar10", "data.verify_checksums=false", "data.val_size=20", "data.eval_batch_size=16"]
        cfg = make_eval_cfg(ckpt_path, *eval_data, "data.test_subset=null", "figures=false", output_dir=runs / name)
        with open_dict(cfg):
            cfg.paths.data_dir = str(tmp_path / "data")
        return cfg

    every = compose_eval("ensemble_all", runs / "*" / "checkpoints" / "best.ckpt")  # the Makefile's glob
    with pytest.raises(
        CheckpointError, match=r"2 configurations .*optim\.lr: 0\.00[12] -> 0\.00[12].*narrow ckpt_path"
    ):
        evaluate(every)
    assert not (runs / "ensemble_all").exists()
    with open_dict(every):
        every.ensemble = {"profile": "fast"}
    with pytest.raises(CheckpointError, match=r"no checkpoint of a completed run.*profile 'smoke', not 'fast'"):
        evaluate(every)

    narrowed = compose_eval("ensemble_smoke", runs / "profile=smoke,seed=*" / "checkpoints" / "best.ckpt")
    record = evaluate(narrowed)
    assert record["ensemble_size"] == 2 and record["member_seeds"] == [0, 1]
    assert [Path(p).parent.parent.name for p in record["checkpoints"]] == [
        "profile=smoke,seed=0",
        "profile=smoke,seed=1",
    ]
    excluded = {Path(e["checkpoint"]).parent.parent.name: e["reason"] for e in record["excluded"]}
    assert excluded.keys() == {"profile=smoke,seed=2", "profile=smoke,seed=3"}
    assert "'failed', not completed" in excluded["profile=smoke,seed=2"]
    assert "no run record" in excluded["profile=smoke,seed=3"]
    member = json.loads((runs / "profile=smoke,seed=0" / "metrics.json").read_text())
    assert record["profile"] == "smoke" and record["configuration"] == configuration(member["signature"])

    table_main([str(runs), "--out", str(tmp_path / "results"), "--profile", "smoke"])
    rows = [line for line in (tmp_path / "results" / "table1.md").read_text().splitlines() if "CIFAR-10" in line]
    (ensemble_row,) = [row for row in rows if "capsnet_cifar10 ensemble" in row]
    assert f"{100 * record['test_error']:.2f} (ensemble of 2)" in ensemble_row
    table_main([str(runs), "--out", str(tmp_path / "other"), "--profile", "fast"])
    assert "capsnet_cifar10 ensemble" not in (tmp_path / "other" / "table1.md").read_text()
