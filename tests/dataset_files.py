"""Small dataset files in each real on-disk format, written by the tests (the real files are
not on the test machine).  Each writer returns what it wrote, for the readers to be
checked against."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def write_cifar10(root: Path, per_class: int = 2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's CIFAR-10 layout: pickled dicts of ``data`` (uint8 [N, 3072], channel-major
    rows) and ``labels`` in <root>/cifar-10-batches-py/."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [*CIFAR_TRAIN, "test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        entry = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"{i}.png" for i in labels],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(entry, handle)
        written[name] = (data.reshape(-1, 3, 32, 32), labels)
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, handle)
    return written


def write_svhn(root: Path, train: int = 60, test: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's SVHN layout: MATLAB files with ``X`` uint8 [32, 32, 3, N] and ``y``
    [N, 1] in 1..10, where 10 is the digit 0."""
    import scipy.io

    folder = root / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in (("train_32x32.mat", train), ("test_32x32.mat", test)):
        x = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
        y = (np.arange(count) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10
        scipy.io.savemat(folder / name, {"X": x, "y": y})
        written[name] = (x, y)
    return written


def _norb_matrix(path: Path, array: np.ndarray) -> None:
    """The NYU binary matrix format: int32 magic, int32 rank, max(3, rank) int32 dims, data."""
    magic = 0x1E3D4C55 if array.dtype == np.uint8 else 0x1E3D4C54
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.array([magic, array.ndim, *dims], dtype="<i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())


SMALLNORB_INSTANCES = {True: (4, 6, 7, 8, 9), False: (0, 1, 2, 3, 5)}  # training / test set


def smallnorb_info(count: int, train: bool, seed: int = 0) -> np.ndarray:
    """``count`` rows of a real -info.mat, int32 [count, 4]: (instance, elevation 0..8,
    azimuth 0, 2, .., 34, lighting 0..5), drawn without repetition from the split's full
    design of 5 categories x 5 instances x 9 elevations x 18 azimuths x 6 lightings (the
    category is not in the info file; 24,300 rows: all of it)."""
    design = np.array(
        list(itertools.product(range(5), SMALLNORB_INSTANCES[train], range(9), range(0, 36, 2), range(6))),
        dtype=np.int32,
    )
    return design[np.random.default_rng(seed).permutation(len(design))[:count], 1:]


def write_smallnorb(
    root: Path, train: int = 40, test: int = 20, seed: int = 0, viewpoints: bool = False
) -> dict[str, tuple[np.ndarray, ...]]:
    """The six smallNORB files (gunzipped) with ``train`` and ``test`` stereo pairs.
    ``viewpoints``: -info.mat rows with real instance/elevation/azimuth/lighting values
    (``smallnorb_info``) instead of random integers 0..8."""
    folder = root / "smallNORB"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, count in (
        ("smallnorb-5x46789x9x18x6x2x96x96-training", train),
        ("smallnorb-5x01235x9x18x6x2x96x96-testing", test),
    ):
        dat = rng.integers(0, 256, size=(count, 2, 96, 96), dtype=np.uint8)
        cat = (np.arange(count) % 5).astype(np.int32)
        info = rng.integers(0, 9, size=(count, 4)).astype(np.int32)
        if viewpoints:
            info = smallnorb_info(count, train=prefix.endswith("training"), seed=seed)
        for kind, array in (("dat", dat), ("cat", cat), ("info", info)):
            _norb_matrix(folder / f"{prefix}-{kind}.mat", array)
        written[prefix] = (dat, cat, info)
    return written
