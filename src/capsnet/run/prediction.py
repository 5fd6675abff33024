"""predict(cfg): classify image files with a trained checkpoint (``src/predict.py``).

Each file is prepared as the model saw its test images: the recipe travels with the
checkpoint (an image-folder run saves its class names, channels, sizes, resize mode and
standardisation in the DataModule's state: see capsnet.data.image_folder), and the file is
decoded by the same function the training data went through
(:func:`capsnet.data.image_folder.load_image`), then centre-cropped and standardised as
:meth:`capsnet.data.images.ImageDataModule.place` does.  A checkpoint of another dataset
(MNIST, CIFAR-10, ...) has no such recipe: its images are squashed to the model's input
size in its channels, standardised if its data config did (an approximation, said so).

Prints one line per readable image (its path, the predicted class, each class's score: the
class capsules' lengths for CapsNet), and writes into the output dir ``predictions.csv``
(atomically) and, for a model with a decoder, ``reconstructions/<n>_<name>.png``: the
decoder's image from the predicted class's capsule.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from capsnet.data.image_folder import (
    CHANNELS,
    ImageFolderDataModule,
    InputRecipe,
    image_files,
    load_images,
    warn_unreadable,
)
from capsnet.data.transforms import center_crop, standardize, to_float_images
from capsnet.nn.routing.squash import capsule_lengths
from capsnet.reporting.figures import displayable, save_png
from capsnet.run.evaluation import CheckpointError, load_checkpoint
from capsnet.run.module import CapsNetModule
from capsnet.run.objectives import CapsuleObjective, LogitsObjective
from capsnet.run.record import METRICS_FILE
from capsnet.run.rundir import RunDir, atomic_write_text
from capsnet.run.validation import ConfigError

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
RECONSTRUCTION_DIR = "reconstructions"
PREDICT_ROOT_KEYS = {"ckpt_path", "inputs", "batch_size", "device", "reconstructions", "paths", "hydra"}
DATAMODULE_STATE_KEY = ImageFolderDataModule.__qualname__  # where Lightning saves the DataModule's state_dict


def validate_predict_config(cfg: DictConfig) -> None:
    """``src/predict.py``'s config, checked before any work (each error names its key)."""
    unknown = sorted(set(cfg.keys()) - PREDICT_ROOT_KEYS)
    if unknown:
        raise ConfigError(
            unknown[0], cfg.get(unknown[0]), f"no such setting; predict takes {', '.join(sorted(PREDICT_ROOT_KEYS))}"
        )
    ckpt = cfg.get("ckpt_path")
    if not isinstance(ckpt, str) or not ckpt:
        raise ConfigError("ckpt_path", ckpt, "must be the path of a capsnet checkpoint (.ckpt)")
    spec = cfg.get("inputs")
    items = [spec] if isinstance(spec, str) else list(spec) if OmegaConf.is_list(spec) else None
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError("inputs", spec, "must be an image file, a folder, a glob pattern, or a list of them")
    batch = cfg.get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigError("batch_size", batch, "must be an integer >= 1")
    if not isinstance(cfg.get("reconstructions"), bool):
        raise ConfigError("reconstructions", cfg.get("reconstructions"), "must be a boolean: true or false")
    resolve_device(cfg.get("device"))


def resolve_device(spec: Any) -> torch.device:
    """``device``: auto (CUDA when there is one, else the CPU), or any torch device name."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(spec))
    except (RuntimeError, ValueError) as error:
        raise ConfigError("device", spec, f"must be auto, cpu, cuda, cuda:<n> or mps ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", spec, "no CUDA device here: use auto or cpu")
    return device


def input_files(spec: Any) -> list[Path]:
    """``inputs``: a file (taken as named), a folder (every image file under it, at any depth,
    by extension), a glob pattern (``**`` recurses; matched folders are expanded), or a list
    of these; duplicates dropped, order kept.  ConfigError naming ``inputs`` when a path does
    not exist or nothing matches."""
    items = [spec] if isinstance(spec, str) else [str(item) for item in spec]
    found: list[Path] = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            if not matches:
                raise ConfigError("inputs", item, "the pattern matches no file (quote it so the shell leaves it whole)")
        else:
            path = Path(item).expanduser()
            if not path.exists():
                raise ConfigError("inputs", item, "no such file or folder")
            matches = [path]
        for match in matches:
            found += image_files(match)[0] if match.is_dir() else [match]
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ConfigError(
            "inputs",
            spec,
            "holds no image file (by extension: .png, .jpg, ...): give a file, a folder of images or a glob",
        )
    return unique


def checkpoint_inputs(path: Path, module: CapsNetModule) -> tuple[InputRecipe, list[str] | None, str]:
    """How to prepare images for this checkpoint, its class names (None: not stored), and a
    note on where the recipe comes from."""
    try:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # it loaded once already: any failure now is the same damage
        raise CheckpointError(f"ckpt_path: {path} could not be read again ({type(error).__name__}: {error})") from error
    data = module.hparams["data"]
    state = raw.get(DATAMODULE_STATE_KEY)
    names = [str(name) for name in state.get("class_names") or []] if isinstance(state, dict) else []
    wanted = {f.name for f in fields(InputRecipe)}
    if isinstance(state, dict) and wanted <= set(state):
        recipe = InputRecipe(**{key: state[key] for key in wanted})
        note = f"the image folder it was trained on ({state.get('root')})"
    else:
        signature = raw.get("capsnet_run_signature") or {}
        channels = int(data["in_channels"])
        if channels not in CHANNELS:
            raise CheckpointError(
                f"ckpt_path: {path} takes {channels}-channel inputs ({signature.get('data.name', 'its dataset')}): "
                "an image file cannot be prepared for it (only 1-channel grey and 3-channel RGB models)"
            )
        size = int(data["image_size"])
        recipe = InputRecipe(channels, size, size, "resize", bool(signature.get("data.standardize", False)))
        note = (
            f"approximated: trained on {signature.get('data.name', 'a dataset other than an image folder')}, whose "
            "own preprocessing this does not repeat"
        )
    if (recipe.image_size, recipe.channels) != (data["image_size"], data["in_channels"]):
        raise CheckpointError(
            f"ckpt_path: {path} is inconsistent: its data state says {recipe.channels}×{recipe.image_size}², its model "
            f"takes {data['in_channels']}×{data['image_size']}²"
        )
    if names and len(names) != data["num_classes"]:
        log.warning("ckpt_path: %d class names for %d classes: shown as indices", len(names), data["num_classes"])
        names = []
    return recipe, names or None, note


def network_view(images: Tensor, recipe: InputRecipe) -> Tensor:
    """uint8 images at ``load_size`` -> what the network sees at test time (as
    ImageDataModule.place: float in [0, 1], central ``image_size`` square, standardised if so)."""
    images = center_crop(to_float_images(images), recipe.image_size)
    return standardize(images) if recipe.standardize else images


@torch.no_grad()
def classify(module: CapsNetModule, images: Tensor, want_reconstructions: bool) -> tuple[Tensor, str, Tensor | None]:
    """(class scores [B, K], what they are, reconstructions [B, C, H, W] or None)."""
    net = module.net
    images = images.to(module.dtype)
    if isinstance(module.objective, CapsuleObjective):
        scores, poses = net.scores(images)
        # the capsule lengths (dynamic routing), or a router's own activations (EM, self-routing)
        kind = "length" if torch.allclose(scores, capsule_lengths(poses), atol=1e-5) else "activation"
        decoder = getattr(net, "decoder", None) is not None
        recon = net.reconstruct(poses, scores.argmax(dim=1)) if decoder and want_reconstructions else None
        return scores, kind, recon
    kind = "logit" if isinstance(module.objective, LogitsObjective) else "activation"
    return module(images), kind, None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "image"


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Classify ``cfg.inputs`` with ``cfg.ckpt_path``; print a line per image and write
    predictions.csv (and reconstructions) into ``cfg.paths.output_dir``."""
    out_dir = Path(cfg.paths.output_dir)
    owner = RunDir(out_dir, job_log=f"{HydraConfig.get().job.name}.log" if HydraConfig.initialized() else None)
    try:  # a refusal leaves no output dir behind (only one this invocation made, holding nothing else)
        validate_predict_config(cfg)
        if (out_dir / METRICS_FILE).exists():
            raise ConfigError(
                "hydra.run.dir",
                str(out_dir),
                "holds a run's record (metrics.json): predictions go to a dir of their own",
            )
        files = input_files(cfg.inputs)
        ckpt = Path(cfg.ckpt_path)
        module = load_checkpoint(ckpt, {})
        recipe, names, note = checkpoint_inputs(ckpt, module)
        images, kept, failed = load_images(files, recipe.channels, recipe.load_size, recipe.resize_mode)
        warn_unreadable(failed, "inputs")
        if not kept:
            raise ConfigError(
                "inputs", cfg.inputs, f"none of the {len(files)} file(s) is a readable image (each is named above)"
            )
        device = resolve_device(cfg.device)
    except BaseException:
        owner.undo()
        raise
    labels = names or [str(k) for k in range(module.hparams["data"]["num_classes"])]
    module.to(device).eval()
    print(
        f"{ckpt}: {len(labels)} classes"
        + ("" if names else " (no class names in the checkpoint: class indices)")
        + f"; inputs as {recipe.describe()}; recipe: {note}"
    )
    rows: list[dict[str, Any]] = []
    kind = "score"
    recon_dir = out_dir / RECONSTRUCTION_DIR
    for start in range(0, len(kept), int(cfg.batch_size)):
        batch = network_view(images[start : start + int(cfg.batch_size)].to(device), recipe)
        scores, kind, recons = classify(module, batch, bool(cfg.reconstructions))
        predicted = scores.argmax(dim=1)
        for offset in range(len(batch)):
            n = start + offset
            path = files[kept[n]]
            row: dict[str, Any] = {
                "path": str(path),
                "predicted_class": labels[int(predicted[offset])],
                "predicted_index": int(predicted[offset]),
                "scores": [float(v) for v in scores[offset].float().cpu()],
                "reconstruction": "",
            }
            if recons is not None:
                target = recon_dir / f"{n:04d}_{_safe(path.stem)}.png"
                save_png(displayable(recons[offset : offset + 1]).clamp(0, 1)[0], target)
                row["reconstruction"] = str(target.relative_to(out_dir))
            rows.append(row)
            listed = " ".join(f"{label}={value:.4f}" for label, value in zip(labels, row["scores"], strict=True))
            print(f"{path}: {row['predicted_class']} (class {row['predicted_index']})  {kind}s: {listed}")
    csv_path = out_dir / PREDICTIONS_FILE
    atomic_write_text(csv_path, _csv(rows, labels, kind))
    skipped = [{"path": str(path), "error": error} for path, error in failed]
    print(
        f"{len(rows)} image(s) classified, {len(skipped)} unreadable skipped"
        + (" (named in the warning above)" if skipped else "")
        + f" -> {csv_path}"
        + (f", {recon_dir}/" if any(row["reconstruction"] for row in rows) else "")
    )
    return {"predictions": rows, "skipped": skipped, "class_names": labels, "score_kind": kind, "csv": str(csv_path)}


def _csv(rows: list[dict[str, Any]], labels: list[str], kind: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["path", "predicted_class", "predicted_index", *(f"{kind}_{label}" for label in labels), "reconstruction"]
    )
    for row in rows:
        writer.writerow(
            [
                row["path"],
                row["predicted_class"],
                row["predicted_index"],
                *(f"{v:.6g}" for v in row["scores"]),
                row["reconstruction"],
            ]
        )
    return buffer.getvalue()
