"""Every router on the paper's body (conv1 → primary capsules → class capsules), and the
routing papers' own models, measured in one run: parameters, FLOPs per image (forward,
counted by torch's FlopCounterMode), training and inference images/s (medians after
warm-up) and peak memory.  The routing-comparison section of ``capsnet.reporting.table``
reads the JSON this writes (``--out``), beside the routers' trained errors.

    python bench/routers.py                                  # 40×40 (the zoo's affNIST protocol)
    python bench/routers.py --size 28 --batch 128 --routers dynamic uniform
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from capsnet.nn.models import CapsNet, count_parameters
from capsnet.run.objectives import OBJECTIVES
from throughput import PeakMemory, median_seconds, megabytes, processor

ROOT = Path(__file__).resolve().parents[1]

LOSS = {"m_pos": 0.9, "m_neg": 0.1, "lam": 0.5, "recon_weight": 0.0005, "official_scaling": False}
LOSS["mask_with_label_at_test"] = False
OWN_MODELS = {  # the routing papers' own models, from their configs
    "efficient_capsnet": (ROOT / "conf" / "model" / "efficient_capsnet.yaml", 28, 1),
    "matrix_capsules_em": (ROOT / "conf" / "model" / "matrix_capsules_em.yaml", 32, 2),
}


def router_model(name: str, size: int) -> nn.Module:
    """CapsNet with the router of conf/routing/<name>.yaml."""
    router = instantiate(OmegaConf.load(ROOT / "conf" / "routing" / f"{name}.yaml"))
    return CapsNet(input_size=size, router=router)


def own_model(name: str) -> tuple[nn.Module, int, int]:
    path, size, channels = OWN_MODELS[name]
    node = OmegaConf.load(path)
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items() if k not in ("name", "objective")}
    kwargs = {k: v for k, v in kwargs.items() if not (isinstance(v, str) and v.startswith("${"))}
    model = instantiate(kwargs, input_size=size, in_channels=channels, num_classes=classes_of(name), task="single")
    return model, size, channels


def classes_of(label: str) -> int:
    """smallNORB's 5 categories for the matrix-capsule model, 10 digits otherwise."""
    return 5 if "matrix_capsules" in label else 10


def flops_per_image(model: nn.Module, x: Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return float(counter.get_total_flops())


def measure(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, args: argparse.Namespace) -> dict:
    model = model.to(device)
    objective = OBJECTIVES[model.objective](LOSS, "single")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        _, parts = objective(model, x, y, None, training=True, step=0)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode():
            objective.scores(model, x)

    with PeakMemory(device) as memory:
        train_s = median_seconds(train_step, device, args.warmup, args.repeats)
    infer_s = median_seconds(infer_step, device, args.warmup, args.repeats)
    return {
        "parameters": count_parameters(model),
        "flops_per_image": flops_per_image(model, x),
        "train_images_per_s": args.batch / train_s,
        "inference_images_per_s": args.batch / infer_s,
        "peak_memory_mb": memory.peak / 2**20 if memory.peak is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--routers", nargs="+", default=sorted(p.stem for p in (ROOT / "conf" / "routing").glob("*.yaml"))
    )
    parser.add_argument("--own-models", nargs="*", default=list(OWN_MODELS))
    parser.add_argument("--size", type=int, default=40, help="input side: 40 for the zoo's affNIST protocol, 28 MNIST")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--out", type=Path, default=Path("results") / "bench_routers.json", help="under the working directory"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where} | torch {torch.__version__} | batch {args.batch} | median of {args.repeats}")
    print(f"processor: {processor()}")
    results: dict = {"device": where, "processor": processor(), "batch": args.batch, "size": args.size, "rows": {}}
    header = f"{'model':<34} {'params':>11} {'MFLOPs/img':>11} {'train img/s':>12} {'infer img/s':>12} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    todo = [(f"routing={r}", partial(router_model, r, args.size), args.size, 1) for r in args.routers]
    for name in args.own_models:
        todo.append((f"model={name}", partial(own_model, name), *OWN_MODELS[name][1:]))
    for label, build, size, channels in todo:
        torch.manual_seed(0)
        built = build()
        model = built[0] if isinstance(built, tuple) else built
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, channels, size, size, generator=generator).to(device)
        y = torch.randint(0, classes_of(label), (args.batch,), generator=generator).to(device)
        row = {**measure(model, x, y, device, args), "input": f"{channels}×{size}×{size}"}
        results["rows"][label] = row
        print(
            f"{label:<34} {row['parameters']:>11,} {row['flops_per_image'] / 1e6:>11.1f} "
            f"{row['train_images_per_s']:>12.1f} {row['inference_images_per_s']:>12.1f} "
            f"{megabytes(None if row['peak_memory_mb'] is None else row['peak_memory_mb'] * 2**20, 8)}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
