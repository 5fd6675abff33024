"""Figures of the paper: data samples, reconstructions, dimension perturbations, routing.

Each figure function returns a tensor image (so tests can check its shape) and the
``write_*`` helpers save PNGs into a run dir.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

PERTURBATIONS = torch.arange(-0.25, 0.25 + 1e-9, 0.05)  # 11 steps, §5.1 / Fig. 4


def displayable(images: Tensor) -> Tensor:
    """[N, C, H, W] as pictures: pixels in [0, 1] as they are; standardised images (CIFAR-10)
    rescaled per image to [0, 1]; a stereo pair (2 channels, smallNORB) as its two views
    side by side in grey."""
    images = images.detach().float().cpu()
    if images.shape[1] == 2:
        images = torch.cat([images[:, :1], images[:, 1:]], dim=-1)
    if images.numel() and (images.min() < 0 or images.max() > 1):
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (high - low).clamp(min=1e-8)
    return images


def grid(images: Tensor, nrow: int) -> Tensor:
    """[N, C, H, W] → one [3, H', W'] image, 2 px white separators (see :func:`displayable`)."""
    return make_grid(displayable(images).clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def reconstructions_beside_inputs(net: torch.nn.Module, images: Tensor, labels: Tensor | None = None) -> Tensor:
    """Row pairs: inputs, then reconstructions from the predicted capsule (or the labels').

    Shapes: images [N, 1, H, W] -> [3, H', W'] with 2 rows of N.
    """
    out = net(images, labels)
    return grid(torch.cat([images, out.reconstructions]), nrow=len(images))


@torch.no_grad()
def dimension_perturbation(net: torch.nn.Module, image: Tensor) -> Tensor:
    """Decode the predicted capsule with each of its 16 dimensions moved over
    [-0.25, 0.25] in steps of 0.05: a 16×11 grid of reconstructions.

    Shapes: image [1, 1, H, W] -> decoded [16 * 11, 1, H, W].
    """
    poses, _ = net.encode(image)
    label = poses.norm(dim=-1).argmax(dim=1)  # (1,)
    dims = poses.shape[-1]
    tweaked = poses.repeat(dims * len(PERTURBATIONS), 1, 1)  # (16*11, K, 16)
    for d in range(dims):
        for s, delta in enumerate(PERTURBATIONS):
            tweaked[d * len(PERTURBATIONS) + s, label, d] += delta
    return net.reconstruct(tweaked, label.repeat(len(tweaked)))


@torch.no_grad()
def routing_convergence(net: torch.nn.Module, images: Tensor, max_iterations: int = 10) -> Tensor | None:
    """Mean absolute change of the coupling coefficients from r−1 to r routing iterations,
    for r = 2..max_iterations, on a batch of digits (routing is deterministic, so the
    coefficients after r iterations of a longer run are those of an r-iteration run).
    None for a model whose router does not iterate (it has nothing to converge).

    Shapes: images [B, 1, H, W] -> [max_iterations - 1].
    """
    by_iterations = getattr(net, "couplings_by_iterations", lambda *_: None)(images, max_iterations)
    if by_iterations is None:
        return None
    return torch.stack([(b - a).abs().mean() for a, b in itertools.pairwise(by_iterations)])


def overlay_reconstructions(images: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """MultiMNIST: the input in grey with each digit's reconstruction in its own colour
    (red, green).  Shapes: three [N, 1, H, W] -> [N, 3, H, W]."""
    grey = images.expand(-1, 3, -1, -1) * 0.35
    red = torch.tensor([1.0, 0.1, 0.1], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    green = torch.tensor([0.1, 1.0, 0.1], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (grey + first * red + second * green).clamp(0, 1)


def plot_routing_convergence(changes: Tensor, path: Path, source: str = "") -> Path:
    """Line plot of :func:`routing_convergence` (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    from matplotlib.ticker import FormatStrFormatter

    ax.semilogy(range(2, len(changes) + 2), changes.detach().float().cpu().numpy(), marker="o")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.4g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.4g"))
    ax.set_xlabel("routing iterations r")
    ax.set_ylabel("mean |c(r) − c(r−1)| (log scale)")
    ax.set_title(
        "Routing convergence: change of the coupling coefficients" + (f"\n({source})" if source else ""), fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_png(image: Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path


def save_labelled(
    image: Tensor,
    path: Path,
    title: str,
    *,
    rows: list[str] | None = None,
    columns: list[str] | None = None,
    legend: list[tuple[str, str]] | None = None,
) -> Path:
    """Save an image grid (from :func:`grid`) with a title, row and column labels and a
    legend of colours, so the figure says what it shows without the code beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    picture = image.permute(1, 2, 0).cpu().numpy()
    height, width = picture.shape[:2]
    scale = 2.2 / 62  # inches per pixel: a 28-px digit is about an inch
    figure, axes = plt.subplots(figsize=(max(4.0, width * scale + 1.6), height * scale + 1.0), dpi=120)
    axes.imshow(picture, interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])
    if rows:
        step = height / len(rows)
        axes.set_yticks([step * (i + 0.5) for i in range(len(rows))], rows, fontsize=7)
    if columns:
        step = width / len(columns)
        axes.set_xticks([step * (i + 0.5) for i in range(len(columns))], columns, fontsize=7)
    if legend:
        axes.legend(
            handles=[Patch(color=colour, label=label) for label, colour in legend],
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.02),
            ncol=len(legend),
            frameon=False,
        )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def write_run_figures(
    net: torch.nn.Module,
    batches: dict[str, tuple[Tensor, ...]],
    out_dir: Path,
    task: str,
    source: str = "the model's current weights",
    sample_titles: dict[str, str] | None = None,
) -> list[Path]:
    """Data samples for every named batch, then the model figures on the first batch (for
    a model with a decoder: reconstructions, dimension perturbation, and the routing
    convergence of an iterative router).

    ``source`` names the weights (e.g. which checkpoint) in every model figure's title;
    ``sample_titles`` (the dataset's) titles the sample grids.

    Drawn eagerly even when the network's layers are compiled (``perf.compile``): the figures'
    new batch sizes and ``iterations=1..10`` would each recompile the digit capsules (past
    dynamo's recompile limit), and they keep outputs of several calls at once, which a
    CUDA-graph mode (``reduce-overhead``) overwrites between calls.
    """
    written = []
    for name, batch in batches.items():
        title = (sample_titles or {}).get(name, f"{name} samples")
        written.append(save_labelled(grid(batch[0][:32], nrow=8), out_dir / f"samples_{name}.png", title))
        if task == "multi":
            written.append(
                save_labelled(
                    grid(batch[2][:8].flatten(0, 1), nrow=8),
                    out_dir / f"samples_{name}_parts.png",
                    f"{title}: the two digits of each composite, side by side (1st+2nd, 3rd+4th, ...)",
                )
            )
    if getattr(net, "decoder", None) is None or not hasattr(net, "encode"):
        return written
    net.eval()
    weights = next(net.parameters())  # the data's float32 images follow the network's device and dtype
    images = next(iter(batches.values()))[0][:8].to(weights.device, weights.dtype)
    if task == "multi":
        poses, _ = net.encode(images)
        top2 = poses.norm(dim=-1).topk(2, dim=1).indices
        first, second = net.reconstruct(poses, top2[:, 0]), net.reconstruct(poses, top2[:, 1])
        overlay = overlay_reconstructions(images, first, second)
        written.append(
            save_labelled(
                grid(torch.cat([images.expand(-1, 3, -1, -1), overlay]), nrow=8),
                out_dir / "reconstructions_multimnist.png",
                f"MultiMNIST reconstructions from the two longest digit capsules\n({source})",
                rows=["input", "reconstructions"],
                legend=[("longest capsule's digit", "red"), ("second longest", "green"), ("input", "grey")],
            )
        )
        return written
    written.append(
        save_labelled(
            reconstructions_beside_inputs(net, images),
            out_dir / "reconstructions.png",
            f"Reconstructions, decoder masked by the predicted class (longest capsule)\n({source})",
            rows=["input", "reconstruction"],
        )
    )
    decoded = dimension_perturbation(net, images[:1])
    written.append(
        save_labelled(
            grid(decoded, nrow=len(PERTURBATIONS)),
            out_dir / "dimension_perturbation.png",
            f"Each dimension of the predicted capsule moved by Δ\n({source})",
            rows=[f"dim {d + 1}" for d in range(decoded.shape[0] // len(PERTURBATIONS))],
            columns=[f"{float(delta):+.2f}" for delta in PERTURBATIONS],
        )
    )
    changes = routing_convergence(net, images)
    if changes is not None:  # only an iterative router converges
        written.append(plot_routing_convergence(changes, out_dir / "routing_convergence.png", source))
    return written
