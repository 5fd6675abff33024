"""Throughput of capsnet's CapsNet against a plain, textbook PyTorch CapsNet, in one process.

For r = 1 and 3 (reconstruction on, batch 128) it times training steps (forward + margin
and reconstruction loss + backward + Adam step) and inference (forward, decoder masked by
the longest capsule), reporting medians after warm-up, images/s, the ratio to the plain
implementation, peak memory and the device.  Both models start from the same weights and
the first loss of each is printed, so equal numbers are known to compute the same thing.

    python bench/throughput.py                 # CPU (or the GPU when one is present)
    python bench/throughput.py --variants default channels_last bf16 compile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from capsnet.nn.losses import margin_loss, reconstruction_loss
from capsnet.nn.models import CapsNet
from plain_capsnet import PlainCapsNet, copy_weights


# --------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak (``max_memory_allocated``).  None on
    the CPU: the process's resident size there says more about what earlier blocks left in
    the allocator than about this one (later models of one run measured 0 MB), so it is not
    reported."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def megabytes(size: int | None, width: int) -> str:
    """``size`` bytes as whole MB, right-aligned in ``width``; a dash when not measured."""
    return f"{size / 2**20:>{width}.0f}" if size is not None else f"{'–':>{width}}"


def median_seconds(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_variant(name: str, iterations: int, device: torch.device) -> tuple[nn.Module, Callable, Callable]:
    """(model, forward(x, y) -> (lengths, recon), autocast context factory)."""
    autocast = nullcontext
    if name == "plain":
        model = PlainCapsNet(iterations).to(device)
        return model, model, autocast
    model = CapsNet(routing_iterations=iterations).to(device)
    forward: Callable = model
    if "channels_last" in name:
        model = model.to(memory_format=torch.channels_last)
    if "bf16" in name:

        def autocast() -> torch.autocast:
            return torch.autocast(device.type, dtype=torch.bfloat16)

    if "compile" in name:  # as perf.compile does: each sub-network, state-dict keys unchanged
        for child in model.children():
            child.compile()

    def run(x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if "channels_last" in name:
            x = x.contiguous(memory_format=torch.channels_last)
        out = forward(x, y)
        return out.lengths, out.reconstructions

    return model, run, autocast


def loss_of(lengths: Tensor, recon: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return margin_loss(lengths.float(), y) + reconstruction_loss(recon, x)


def measure_variant(
    variant: str,
    iterations: int,
    reference: CapsNet,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Images/s for training and inference, peak memory and the first loss of one variant."""
    model, forward, autocast = build_variant(variant, iterations, device)
    if variant == "plain":
        copy_weights(reference, model)
    else:
        model.load_state_dict(reference.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with autocast():
        first_loss = loss_of(*forward(x, y), x, y).item()

    def train_step() -> None:
        with autocast():
            loss = loss_of(*forward(x, y), x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            forward(x)

    with PeakMemory(device) as memory:
        train_s = median_seconds(train_step, device, args.warmup, args.repeats)
    infer_s = median_seconds(infer_step, device, args.warmup, args.repeats)
    return {"train": args.batch / train_s, "infer": args.batch / infer_s, "peak": memory.peak, "first_loss": first_loss}


# CPU features that decide how fast bf16 and fp32 run; bf16 ran at 1.97x fp32 on one CPU
# of this project's and at 0.70x on another, so every table says which processor it is.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_fp16", "sve", "bf16")


def processor() -> str:
    """The CPU model and its speed-relevant instruction-set flags, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    present = [flag for flag in SPEED_FLAGS if flag in flags]
    return f"{model} [{', '.join(present) or 'none of ' + ', '.join(SPEED_FLAGS)}]"


def bench(args: argparse.Namespace) -> None:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name} | torch {torch.__version__} | batch {args.batch} | median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"processor: {processor()}")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    header = f"{'r':>2} {'variant':<22} {'train img/s':>12} {'x plain':>8} {'infer img/s':>12} {'x plain':>8} {'peak MB':>9} {'first loss':>11}"
    print(header)
    print("-" * len(header))
    for iterations in args.iters:
        torch.manual_seed(0)
        reference = CapsNet(routing_iterations=iterations)
        plain_rate: dict[str, float] = {}
        for variant in ["plain", *args.variants]:
            result = measure_variant(variant, iterations, reference, x, y, device, args)
            if variant == "plain":
                plain_rate = {"train": result["train"], "infer": result["infer"]}
            print(
                f"{iterations:>2} {variant:<22} {result['train']:>12.1f} {result['train'] / plain_rate['train']:>7.2f}x "
                f"{result['infer']:>12.1f} {result['infer'] / plain_rate['infer']:>7.2f}x "
                f"{megabytes(result['peak'], 9)} {result['first_loss']:>11.6f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--variants", nargs="+", default=["default", "channels_last", "bf16", "compile", "compile+bf16"]
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    bench(parser.parse_args())


if __name__ == "__main__":
    main()
