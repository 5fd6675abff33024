"""Your own images: torchvision's ``ImageFolder`` layout (``root/<class>/<image>``), any
format PIL reads, any size and colour, decoded once into uint8 tensors held on the device.

Classes are the folder names under ``root``, sorted (as torchvision sorts them); hidden
folders (``.ipynb_checkpoints``) are not classes.  Every file under a class folder, at any
depth, whose extension PIL knows is an image of that class; other files are left alone.  A
file PIL cannot decode (corrupt, truncated, not really an image) is named with its error in
one warning and left out; a class folder without one readable image, or a root without class
folders, is a :class:`~capsnet.data.base.DataError` naming the folder.

Each image is decoded with PIL by :func:`load_image`, the one function that
``src/predict.py`` uses too, so a prediction sees a file exactly as training and test did:
EXIF rotation applied, transparency composited on black, converted to ``channels`` (1: PIL's
ITU-R 601-2 luma "L"; 3: RGB, grey repeated; 16-bit grey scaled to 8 bits), then brought to a square of
``load_size`` pixels by ``resize_mode`` (bilinear, antialiased): ``resize`` squashes the
image to the square (aspect ratio not kept), ``center_crop`` scales its short side to the
square and keeps the middle, ``pad`` scales its long side to the square and pads with black.
The network sees the central ``image_size`` square of that (the whole of it unless
``load_size`` is larger); training may take random windows, flips and jitter instead, done on
the device by :class:`~capsnet.data.images.ImageDataModule`.

The test split is ``test_root`` when given (its class folders must be classes of ``root``),
else ``test_size`` files of ``root`` held out by a seeded hash of ``split_seed`` and each
file's path relative to ``root`` (not the listing order, not the run seed).  The validation
split is then held out of the rest as for every dataset (``val_size``, ``split_seed``).

The class names travel with every checkpoint (the DataModule's ``state_dict``, which
Lightning stores under this class's name), with the input recipe, for ``src/predict.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from capsnet.data.base import DataError
from capsnet.data.images import CROPS, ImageDataModule

log = logging.getLogger(__name__)

RESIZE_MODES = ("resize", "center_crop", "pad")
CHANNELS = (1, 3)
MAX_LISTED = 50  # unreadable files named one by one in the warning; the rest counted
# The DataModule's own arguments of ImageDataModule that an image folder sets itself.
FIXED_ARGUMENTS = {"crop_size": "data.image_size", "verify_checksums": None, "download": None}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(key: str, value: object, allowed: str) -> NoReturn:
    """An invalid image-folder setting: a DataError (refused before any work) naming the key."""
    raise DataError(f"invalid config value {key}={value!r}: {allowed}")


@functools.cache
def image_extensions() -> frozenset[str]:
    """Every file extension PIL has a reader for (lower case, with the dot)."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class InputRecipe:
    """How a file becomes what the network sees: decoded to ``channels`` at ``load_size``
    by ``resize_mode`` (:func:`load_image`), then the central ``image_size`` square, in
    [0, 1], standardised per image if ``standardize``."""

    channels: int
    image_size: int
    load_size: int
    resize_mode: str
    standardize: bool

    def describe(self) -> str:
        colour = {1: "grey", 3: "RGB"}[self.channels]
        how = {"resize": "squashed to", "center_crop": "short side scaled, centre cropped to", "pad": "padded to"}
        text = f"{colour}, {how[self.resize_mode]} {self.load_size}×{self.load_size}"
        if self.load_size != self.image_size:
            text += f", central {self.image_size}×{self.image_size}"
        return text + (", standardised per image" if self.standardize else ", pixels in [0, 1]")


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL image as "L" (channels=1) or "RGB" (channels=3): 16-bit grey (PIL's "I;16"
    and "I" modes, read as 0..65535) scaled to 8 bits rather than clipped, transparent pixels
    composited on black, everything else by PIL's own ``convert``."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.round(values / 65535 * 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def _to_square(image: Image.Image, size: int, mode: str) -> Image.Image:
    width, height = image.size
    resample = Image.Resampling.BILINEAR
    if mode == "resize":
        return image.resize((size, size), resample)
    if mode == "center_crop":
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        return image.crop((left, top, left + size, top + size))
    scale = size / max(width, height)  # pad
    new = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image.resize(new, resample), ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def load_image(path: str | Path, channels: int, size: int, resize_mode: str) -> Tensor:
    """One image file as uint8 [channels, size, size] (see the module docstring).  Raises
    whatever PIL raises for a file it cannot decode (the caller names the file)."""
    with Image.open(path) as image:
        image.draft(image.mode, (size, size))  # JPEG: decode at a reduced scale, still >= size per side
        image.load()  # decode now: a truncated or corrupt file fails here, not later
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, SyntaxError):  # damaged EXIF: pixels stand
            image = ImageOps.exif_transpose(image) or image
        image = _to_square(_to_mode(image, channels), size, resize_mode)
        array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_images(
    paths: Sequence[Path], channels: int, size: int, resize_mode: str, workers: int | None = None
) -> tuple[Tensor, list[int], list[tuple[Path, str]]]:
    """Decode ``paths`` (threads; the order is kept): (uint8 [M, C, size, size] of the M
    readable ones, their indices in ``paths``, [(path, error)] of the others)."""

    def one(path: Path) -> Tensor | str:
        try:
            return load_image(path, channels, size, resize_mode)
        except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a bad file: each is named, left out
            return f"{type(error).__name__}: {error}"

    workers = workers or min(8, os.cpu_count() or 1)
    images = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    kept: list[int] = []
    failed: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, (path, result) in enumerate(zip(paths, pool.map(one, paths), strict=True)):
            if isinstance(result, str):
                failed.append((path, result))
            else:
                images[len(kept)] = result
                kept.append(index)
    return images[: len(kept)], kept, failed


def warn_unreadable(failed: list[tuple[Path, str]], what: str) -> None:
    """One warning naming each unreadable file and its error (the first MAX_LISTED)."""
    if not failed:
        return
    listed = "; ".join(f"{path}: {error}" for path, error in failed[:MAX_LISTED])
    more = f"; and {len(failed) - MAX_LISTED} more" if len(failed) > MAX_LISTED else ""
    log.warning("%s: skipped %d unreadable image file(s): %s%s", what, len(failed), listed, more)


def class_folders(root: Path, key: str) -> list[str]:
    """The class folder names under ``root``, sorted; DataError naming ``root`` when there are none."""
    if not root.is_dir():
        raise DataError(f"{key}: no such folder: {root.resolve()} (expected the layout {key}/<class>/<image>)")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        loose = sum(1 for entry in os.scandir(root) if entry.is_file())
        hint = f" ({loose} file(s) lie directly in it: put each class's images in a folder of its own)" if loose else ""
        raise DataError(
            f"{key}: {root.resolve()} has no class folders{hint}; expected torchvision's ImageFolder layout "
            f"{key}/<class>/<image>, e.g. {root}/cats/1.jpg and {root}/dogs/1.jpg"
        )
    return names


def image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` at any depth (hidden ones skipped), sorted, and how many
    other files were left alone."""
    extensions = image_extensions()
    found, others = [], 0
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in extensions:
                found.append(Path(current) / name)
            else:
                others += 1
    return sorted(found), others


def held_out(relative: list[str], test_size: int | float, split_seed: int) -> list[int]:
    """Indices of the files held out for testing, in their hash order: the ``test_size`` (a
    count, or a fraction of the files; at least one, and one file always left to train on)
    whose SHA-256 of (split_seed, path relative to the root) is lowest."""
    count = test_size if _is_int(test_size) else round(test_size * len(relative))
    count = min(max(int(count), 1), len(relative) - 1)
    ranked = sorted(
        range(len(relative)), key=lambda i: hashlib.sha256(f"{split_seed}\0{relative[i]}".encode()).digest()
    )
    return ranked[:count]


class ImageFolderDataModule(ImageDataModule):
    """Images in ``root/<class>/<image>`` (see the module docstring).

    Args:
        root: the folder of class folders.
        test_root: a separate test folder of the same layout; None: hold ``test_size`` out of root.
        test_size: files held out of ``root`` for testing when there is no ``test_root``: a
            count (int >= 1) or a fraction in (0, 1).
        channels: 1 (grey) or 3 (RGB); every image is converted.
        image_size: the side of the square the network sees.
        load_size: the side images are decoded to (None: ``image_size``); larger leaves room
            for random training crops (``train_crop=random``), the test taking the centre.
        resize_mode: ``resize``, ``center_crop`` or ``pad`` (see the module docstring).
        train_crop, flip, brightness, contrast, standardize: as for every image dataset
            (:class:`~capsnet.data.images.ImageDataModule`), done on the device.
        **kwargs: the shared ones (batch sizes, val_size, split_seed, subsets, ...).
    """

    title = "your images"
    sample_titles: ClassVar[dict[str, str]] = {
        "test_images": "your test images as the network sees them",
        "train_center": "your training images, test-time view (training may crop, flip and jitter them)",
    }

    def __init__(
        self,
        *,
        root: str,
        test_root: str | None = None,
        test_size: int | float = 0.1,
        channels: int = 3,
        image_size: int = 32,
        load_size: int | None = None,
        resize_mode: str = "resize",
        train_crop: str = "center",
        **kwargs: Any,
    ) -> None:
        for name, instead in FIXED_ARGUMENTS.items():
            if name in kwargs:
                _refuse(
                    f"data.{name}",
                    kwargs[name],
                    f"not a setting of image folders{f'; use {instead}' if instead else ''}",
                )
        if not isinstance(root, str) or not root:
            _refuse("data.root", root, "must be the folder holding one folder of images per class")
        if channels not in CHANNELS or isinstance(channels, bool):
            _refuse("data.channels", channels, "must be 1 (grey) or 3 (RGB)")
        if train_crop not in CROPS:
            _refuse("data.train_crop", train_crop, f"must be one of {', '.join(CROPS)}")
        if resize_mode not in RESIZE_MODES:
            _refuse("data.resize_mode", resize_mode, f"must be one of {', '.join(RESIZE_MODES)}")
        if not _is_int(image_size) or image_size < 1:
            _refuse("data.image_size", image_size, "must be an integer >= 1 (pixels)")
        if load_size is not None and (not _is_int(load_size) or load_size < image_size):
            _refuse("data.load_size", load_size, f"must be null or an integer >= data.image_size={image_size}")
        fraction = isinstance(test_size, float) and 0 < test_size < 1
        if not (fraction or (_is_int(test_size) and test_size >= 1)):
            _refuse("data.test_size", test_size, "must be a count (an integer >= 1) or a fraction in (0, 1)")
        super().__init__(crop_size=image_size, train_crop=train_crop, verify_checksums=False, download=False, **kwargs)
        self.root, self.test_root = root, test_root
        self.test_size = test_size
        self.channels = channels
        self.load_size = load_size or image_size
        self.resize_mode = resize_mode
        self.title = f"your images: {root}"
        self._classes: list[str] | None = None
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.split_files: dict[str, list[Path]] = {}  # the readable files of each split, in tensor order
        self.skipped: list[tuple[Path, str]] = []  # unreadable files: (path, error)

    # ---- what the model is built from ---------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """The class folders of ``root``, sorted; label i is class_names[i]."""
        if self._classes is None:
            self._classes = class_folders(Path(self.root).expanduser(), "data.root")
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.class_names)

    @property
    def in_channels(self) -> int:  # type: ignore[override]
        return self.channels

    @property
    def recipe(self) -> InputRecipe:
        return InputRecipe(self.channels, self.crop_size, self.load_size, self.resize_mode, self.standardize)

    # ---- files --------------------------------------------------------------------------------
    def _listing(self) -> dict[str, list[tuple[Path, int, Path]]]:
        """(file, label, its class folder) of each split, before decoding; DataError for a
        class folder without image files."""
        root = Path(self.root).expanduser()
        labels = {name: i for i, name in enumerate(self.class_names)}

        def files_of(folder: Path, names: list[str], key: str) -> list[tuple[Path, int, Path]]:
            listed, others = [], 0
            for name in names:
                found, skipped = image_files(folder / name)
                others += skipped
                if not found:
                    raise DataError(
                        f"{key}: the class folder {(folder / name).resolve()} holds no image file (none with an "
                        f"extension PIL reads, e.g. .png or .jpg): every class folder needs at least one image; "
                        f"add images or remove the folder"
                    )
                listed += [(path, labels[name], folder / name) for path in found]
            if others:
                log.info("%s: left alone %d file(s) that are not images by their extension", key, others)
            return listed

        train = files_of(root, self.class_names, "data.root")
        if self.test_root is None and len(train) < 2:
            raise DataError(f"data.root: {root.resolve()} holds {len(train)} image file(s): too few to train and test")
        if self.test_root is None:
            relative = [path.relative_to(root).as_posix() for path, _, _ in train]
            test = held_out(relative, self.test_size, self.split_seed)
            chosen = set(test)
            return {"train": [f for i, f in enumerate(train) if i not in chosen], "test": [train[i] for i in test]}
        test_dir = Path(self.test_root).expanduser()
        test_names = class_folders(test_dir, "data.test_root")
        unknown = [name for name in test_names if name not in labels]
        if unknown:
            raise DataError(
                f"data.test_root: {(test_dir / unknown[0]).resolve()} is not a class of data.root ({root.resolve()} "
                f"has {', '.join(self.class_names)}): the test folders must use the training class names"
            )
        missing = [name for name in self.class_names if name not in test_names]
        if missing:
            log.warning("data.test_root: no test folder for class(es) %s", ", ".join(missing))
        return {"train": train, "test": files_of(test_dir, test_names, "data.test_root")}

    def prepare_data(self) -> None:
        """List the folders and decode every image once (kept for ``read``): unreadable files
        are named in one warning and left out; a class folder left without a readable image
        is refused, naming it."""
        if self._splits:
            return
        listing = self._listing()
        skipped: list[tuple[Path, str]] = []
        readable: dict[Path, int] = {}
        decoded: dict[str, tuple[Tensor, Tensor]] = {}
        for split, files in listing.items():
            paths = [path for path, _, _ in files]
            images, kept, failed = load_images(paths, self.channels, self.load_size, self.resize_mode)
            skipped += failed
            for _, _, folder in files:
                readable.setdefault(folder, 0)
            for i in kept:
                readable[files[i][2]] += 1
            decoded[split] = (images, torch.tensor([files[i][1] for i in kept], dtype=torch.int64))
            self.split_files[split] = [paths[i] for i in kept]
        warn_unreadable(skipped, "data.root" if self.test_root is None else "data.root/data.test_root")
        test_dir = Path(self.test_root).expanduser() if self.test_root is not None else None
        for folder, count in readable.items():
            if not count:
                key = "data.test_root" if test_dir is not None and folder.parent == test_dir else "data.root"
                raise DataError(
                    f"{key}: the class folder {folder.resolve()} holds no readable image (every image file in it failed to "
                    f"decode; see the warning above): fix or remove its files, or remove the folder"
                )
        for split, (_, labels) in decoded.items():
            if not len(labels):
                raise DataError(f"the {split} split has no readable image (see the warning above): fix its files")
        self.skipped, self._splits = skipped, decoded
        for split, (_, labels) in decoded.items():
            log.info(
                "%s images: %d of %d classes, decoded to %d×%d×%d", split, len(labels), self.num_classes,
                self.channels, self.load_size, self.load_size,
            )  # fmt: skip

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        self.prepare_data()
        return self._splits["train" if train else "test"]

    # ---- what travels with a checkpoint ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The class names and the input recipe, saved in every checkpoint (predict reads them)."""
        return {"class_names": list(self.class_names), "root": str(self.root), **asdict(self.recipe)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume and test: the folder must still have the classes the weights were trained on."""
        saved = list(state_dict.get("class_names") or [])
        if saved and saved != self.class_names:
            raise DataError(
                f"data.root: {self.root} has the classes {self.class_names}, but the checkpoint was trained on "
                f"{saved}: its class outputs would mean other classes. Restore the folders, or train afresh "
                "(resume=false)"
            )
