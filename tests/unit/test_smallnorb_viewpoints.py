"""smallNORB novel-viewpoint splits: the split definitions on the full 24,300-pair design,
and the DataModule on files in the real format (tests/dataset_files.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.data.mnist import DataError
from capsnet.data.smallnorb import SmallNORBDataModule
from capsnet.data.smallnorb_viewpoints import SmallNORBViewpointDataModule, familiar_mask, viewpoint_degrees
from dataset_files import _norb_matrix, smallnorb_info, write_smallnorb

CONF = Path(__file__).resolve().parents[2] / "conf"
TRAIN, TEST = "smallnorb-5x46789x9x18x6x2x96x96-training", "smallnorb-5x01235x9x18x6x2x96x96-testing"


def degrees_by_hand(info: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(azimuth, elevation) in degrees: azimuth = 10 × column 2, elevation = 30 + 5 × column 1."""
    return info[:, 2] * 10, 30 + 5 * info[:, 1]


def test_split_definitions_on_the_full_design() -> None:
    """Each real split holds every (instance, elevation, azimuth, lighting) of its 5
    instances once per category (24,300 pairs); on that design each split trains on a third."""
    for train in (True, False):
        info = smallnorb_info(24_300, train=train)
        combos, copies = np.unique(info, axis=0, return_counts=True)
        assert len(combos) == 4_860 and (copies == 5).all()  # 5 instances·9·18·6, once per category
        azimuth, elevation = degrees_by_hand(info)
        np.testing.assert_array_equal(viewpoint_degrees(info, "azimuth"), azimuth)
        np.testing.assert_array_equal(viewpoint_degrees(info, "elevation"), elevation)

        az = familiar_mask(info, "azimuth")
        assert az.sum() == 8_100 and (~az).sum() == 16_200
        assert sorted(set(azimuth[az].tolist())) == [0, 20, 40, 300, 320, 340]
        assert sorted(set(azimuth[~az].tolist())) == list(range(60, 300, 20))  # 60°, 80°, …, 280°

        el = familiar_mask(info, "elevation")
        assert el.sum() == 8_100 and (~el).sum() == 16_200
        assert sorted(set(elevation[el].tolist())) == [30, 35, 40]
        assert sorted(set(elevation[~el].tolist())) == [45, 50, 55, 60, 65, 70]

        assert familiar_mask(info, "standard").all()
        custom = familiar_mask(info, "azimuth", (0, 180))
        assert custom.sum() == 24_300 * 2 // 18 and set(azimuth[custom].tolist()) == {0, 180}


def test_bad_settings_and_corrupt_info_values() -> None:
    info = smallnorb_info(100, train=True)
    with pytest.raises(ValueError, match="viewpoint_split must be one of"):
        familiar_mask(info, "roll")
    with pytest.raises(ValueError, match="non-empty subset"):
        familiar_mask(info, "azimuth", (10,))  # not a smallNORB azimuth
    with pytest.raises(ValueError, match="non-empty subset"):
        SmallNORBViewpointDataModule(data_dir=".", crop_size=32, viewpoint_split="elevation", train_degrees=[75])
    bad = info.copy()
    bad[7, 2] = 35  # azimuth values are even
    with pytest.raises(DataError, match=r"azimuth values \[35\]"):
        familiar_mask(bad, "azimuth")
    bad = info.copy()
    bad[3, 1] = 9  # elevations 0..8
    with pytest.raises(DataError, match=r"elevation values \[9\]"):
        familiar_mask(bad, "elevation")


def _module(root: Path, split: str, **kwargs: object) -> SmallNORBViewpointDataModule:
    return SmallNORBViewpointDataModule(
        data_dir=str(root), crop_size=32, val_size=4, verify_checksums=False, viewpoint_split=split, **kwargs
    )


@pytest.mark.parametrize("split", ["azimuth", "elevation"])
def test_datamodule_reads_the_split_from_the_info_files(tmp_path: Path, split: str) -> None:
    written = write_smallnorb(tmp_path, train=90, test=72, viewpoints=True)
    reference = SmallNORBDataModule(data_dir=str(tmp_path), crop_size=32, verify_checksums=False)
    masks = {}
    for prefix in (TRAIN, TEST):
        azimuth, elevation = degrees_by_hand(written[prefix][2])
        masks[prefix] = (
            np.isin(azimuth, [300, 320, 340, 0, 20, 40]) if split == "azimuth" else np.isin(elevation, [30, 35, 40])
        )
        assert 0 < masks[prefix].sum() < len(masks[prefix])  # the written files exercise both sides

    module = _module(tmp_path, split)
    module.prepare_data()
    module.setup()
    train_images, train_labels = reference.read(train=True)
    keep = torch.from_numpy(masks[TRAIN])
    full = module.full_training_split()
    assert torch.equal(full[0], train_images[keep]) and torch.equal(full[1], train_labels[keep])
    assert module.num_training_examples() == int(masks[TRAIN].sum())
    assert len(module.train_set[1]) + len(module.val_set[1]) == int(masks[TRAIN].sum())

    test_images, test_labels = reference.read(train=False)
    keep = torch.from_numpy(masks[TEST])
    assert torch.equal(module.test_set[0], test_images[~keep]) and torch.equal(module.test_set[1], test_labels[~keep])
    assert torch.equal(module.familiar_set[0], test_images[keep])
    assert torch.equal(module.familiar_set[1], test_labels[keep])

    assert module.test_set_names == ("test", "familiar")
    loaders = module.test_dataloader()
    assert [len(loader.tensors[0]) for loader in loaders] == [int((~masks[TEST]).sum()), int(masks[TEST].sum())]


def test_standard_split_is_the_plain_datamodule(tmp_path: Path) -> None:
    write_smallnorb(tmp_path, train=30, test=20, viewpoints=True)
    module = _module(tmp_path, "standard")
    module.setup()
    reference = SmallNORBDataModule(data_dir=str(tmp_path), crop_size=32, val_size=4, verify_checksums=False)
    reference.setup()
    for mine, theirs in ((module.train_set, reference.train_set), (module.test_set, reference.test_set)):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    assert module.test_set_names == ("test",) and module.familiar_set is None
    assert len(module.test_dataloader().tensors[0]) == 20


def test_test_subset_limits_both_test_sets(tmp_path: Path) -> None:
    write_smallnorb(tmp_path, train=40, test=60, viewpoints=True)
    module = _module(tmp_path, "elevation", test_subset=5)
    module.setup()
    assert len(module.test_set[1]) == 5 and len(module.familiar_set[1]) == 5


def test_corrupt_info_file_is_refused(tmp_path: Path) -> None:
    written = write_smallnorb(tmp_path, train=30, test=20, viewpoints=True)
    info = written[TRAIN][2].copy()
    info[0, 2] = 36  # no azimuth 360°
    _norb_matrix(tmp_path / "smallNORB" / f"{TRAIN}-info.mat", info)
    with pytest.raises(DataError, match=r"azimuth values \[36\]"):
        _module(tmp_path, "azimuth").setup()


@pytest.mark.parametrize(("name", "split"), [("smallnorb_azimuth", "azimuth"), ("smallnorb_elevation", "elevation")])
def test_data_configs(tmp_path: Path, name: str, split: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"data={name}", "model=matrix_capsules_em", "logger=none"])
    GlobalHydra.instance().clear()
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["name"] == name and data["viewpoint_split"] == split and data["resize"] == 48  # smallnorb.yaml's
    kwargs = {k: v for k, v in data.items() if k not in ("name", "lr_decay_steps")}
    module = instantiate(kwargs, data_dir=str(tmp_path), seed=0, _convert_="all")
    assert isinstance(module, SmallNORBViewpointDataModule) and module.viewpoint_split == split
    assert module.val_size == 810 and module.in_channels == 2
    assert cfg.model._target_ == "capsnet.nn.matrix_capsules.MatrixCapsulesEM"
