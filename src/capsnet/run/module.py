"""One LightningModule for every network: losses, masking, metrics and the optimiser."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torchmetrics
from hydra.utils import instantiate
from torch import Tensor, nn

from capsnet.run.objectives import objective_for

TASKS = ("single", "multi")
RUN_SIGNATURE_KEY = "capsnet_run_signature"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and each loss part."""


# Checkpoints written before models were named by ``_target_`` carry only ``name``.
LEGACY_TARGETS = {"capsnet": "capsnet.nn.models.CapsNet", "baseline": "capsnet.nn.models.paper_baseline"}
# Checkpoints written before capsnet's subpackages name the flat module paths.
LEGACY_MODULES = {"capsnet.models.": "capsnet.nn.models."}
RECORD_ONLY_KEYS = ("name", "objective")  # model config keys for capsnet, not for the class
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def build_model(model: dict[str, Any], *, image_size: int, in_channels: int, num_classes: int, task: str) -> nn.Module:
    """Instantiate the model config's ``_target_`` for this dataset.

    The contract of every model class: keyword arguments ``input_size``, ``in_channels``,
    ``num_classes`` and ``task`` come from the data; every other key of the model config
    (except ``name`` and ``objective``) is the class's own; the class declares what it is
    trained to minimise (``objective``: see capsnet.run.objectives).
    """
    kwargs = {k: v for k, v in model.items() if k not in RECORD_ONLY_KEYS}
    kwargs.setdefault("_target_", LEGACY_TARGETS.get(model.get("name", "")))
    for old, new in LEGACY_MODULES.items():
        if isinstance(kwargs["_target_"], str) and kwargs["_target_"].startswith(old):
            kwargs["_target_"] = new + kwargs["_target_"].removeprefix(old)
    if kwargs["_target_"] is None:
        raise ValueError(f"model config has no _target_ (name={model.get('name')!r}): name the model's class")
    return instantiate(
        kwargs,
        input_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        task=task,
        _convert_="all",
    )


class Float32States:
    """A torchmetrics mixin: the metric's states stay float32 under every trainer precision,
    so counts are exact (to 2^24) and errors are exact fractions.

    Lightning's pure precisions cast the whole LightningModule with ``module.to(dtype)``,
    which torchmetrics applies to metric states too (it guards only ``.half()``,
    ``.double()`` and the like), and a metric built inside a step under a pure precision
    takes the step's default dtype: in bfloat16 (8 significant bits) 10,000 test examples
    were counted as 10,112 and an epoch's counter stopped at 32,768.  Here a module-wide
    cast moves the states to the new device and leaves their dtype alone; ``set_dtype``
    remains the one deliberate way to change it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_dtype(torch.float32)

    def _apply(self, fn: Any, exclude_state: Any = "") -> nn.Module:
        if self._dtype_convert:  # set_dtype
            return super()._apply(fn, exclude_state)
        dtype = self._dtype

        def move_only(tensor: Tensor) -> Tensor:
            return tensor.to(fn(tensor.new_empty(0)).device)

        this = super()._apply(move_only, exclude_state)
        this._dtype = dtype
        return this


class ExactMean(Float32States, torchmetrics.MeanMetric):
    """MeanMetric with float32 states under every precision (see :class:`Float32States`)."""


class ExactSum(Float32States, torchmetrics.SumMetric):
    """SumMetric with float32 states under every precision (see :class:`Float32States`)."""


def error_metric() -> torchmetrics.MeanMetric:
    """Mean of per-example 0/1 errors, in float32 under every precision.  Errors are never
    NaN, so the NaN check is off: its ``bool(nans.any())`` would otherwise stall the GPU at
    every update."""
    return ExactMean(nan_strategy="disable")


def top_k_error(scores: Tensor, labels: Tensor) -> Tensor:
    """Per-example 0/1 error.  Labels [B]: argmax must match.  Labels [B, k]: the k
    highest scores must equal the labels as a set (MultiMNIST scoring).

    Shapes: scores [B, K]; labels [B] or [B, k] -> float [B].
    """
    if labels.dim() == 1:
        return (scores.argmax(dim=1) != labels).float()
    k = labels.shape[1]
    predicted = scores.topk(k, dim=1).indices.sort(dim=1).values
    return (predicted != labels.sort(dim=1).values).any(dim=1).float()


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s random stream, well mixed from (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0])


class CapsNetModule(L.LightningModule):
    """Trains any capsnet model with the objective it declares (capsnet.run.objectives).

    Args:
        model: model config (``name`` plus the model's own keys).
        data: what the network needs to know about the data (image_size, in_channels,
            num_classes, task).
        loss: m_pos, m_neg, lam, recon_weight, official_scaling, mask_with_label_at_test.
        optim: ``optimizer`` and ``schedule`` (``_partial_`` configs: conf/optim/), or, in
            checkpoints written before those were configurable, lr, decay_rate, decay_steps.
        nan_check_every: check the loss for NaN/inf every this many steps (1 = every step;
            larger avoids a host sync per step on a GPU).
        channels_last: run the convolutions in NHWC memory layout.
        compile: ``torch.compile`` each sub-network (state-dict keys stay unchanged, so
            checkpoints load either way): False, True (the default mode) or a mode name,
            e.g. "reduce-overhead" (CUDA graphs) or "max-autotune".
    """

    def __init__(
        self,
        model: dict[str, Any],
        data: dict[str, Any],
        loss: dict[str, Any],
        optim: dict[str, Any],
        nan_check_every: int = 1,
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        # logger=False: loggers get the whole resolved run config instead (capsnet.run.tracking);
        # Lightning's own logging of these arguments would overwrite its top-level keys.
        self.save_hyperparameters(logger=False)
        assert data["task"] in TASKS, f"task must be one of {TASKS}, got {data['task']!r}"
        self.task = data["task"]
        self.net = build_model(
            model,
            image_size=data["image_size"],
            in_channels=data["in_channels"],
            num_classes=data["num_classes"],
            task=self.task,
        )
        self.objective = objective_for(self.net, model.get("objective"), loss, self.task)
        self.loss_cfg, self.optim_cfg = loss, optim
        self.nan_check_every = nan_check_every
        self.channels_last, self.compile_net = channels_last, compile
        self.errors = nn.ModuleDict({f"{stage}_error": error_metric() for stage in ("train", "val", "test")})
        # Examples evaluated, summed over DDP ranks: proof that each counts exactly once.
        self.examples = nn.ModuleDict({stage: ExactSum(nan_strategy="disable") for stage in ("val", "test")})
        self.extra_errors = nn.ModuleDict()  # extra test sets, e.g. affNIST
        self.run_signature: dict[str, Any] | None = None  # set by capsnet.run.training, saved in checkpoints

    def forward(self, x: Tensor) -> Tensor:
        """Class scores: capsule lengths (or activations) for capsule networks, logits for CNNs."""
        return self.objective.scores(self.net, self._layout(x))

    def configure_model(self) -> None:
        """Apply the speed switches once, on the training device."""
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_net:
            mode = self.compile_net if isinstance(self.compile_net, str) else None
            for child in self.net.children():
                child.compile(mode=mode)

    def _begin_cuda_graph_step(self) -> None:
        """Under a CUDA-graph compile mode, each batch is one CUDA-graph step.  Each layer is
        compiled on its own, and without a backward pending (validation, test) every compiled
        call would otherwise start a new step and free the previous layer's output, which is
        this layer's input."""
        if self.compile_net in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._begin_cuda_graph_step()

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_cuda_graph_step()

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_cuda_graph_step()

    def _layout(self, images: Tensor) -> Tensor:
        """Images as the network takes them: in its own dtype (under bf16-true, 16-true or
        float64 the data module's float32 images follow the weights; a no-op otherwise),
        and NHWC when ``channels_last`` is on."""
        images = images.to(self.dtype)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _step(self, batch: tuple[Tensor, ...], stage: str, errors: torchmetrics.MeanMetric) -> Tensor:
        images, labels = batch[0], batch[1]
        parts = batch[2] if self.task == "multi" else None
        scores, loss_parts = self.objective(
            self.net, self._layout(images), labels, parts, training=self.training, step=self.global_step
        )
        loss = sum(loss_parts.values())
        errors.update(top_k_error(scores.detach(), labels))
        on_step = stage == "train"
        # add_dataloader_idx=False: the dataset's own test split keeps its plain key even
        # when extra test sets (affNIST) are evaluated beside it.  Eval losses are averaged
        # over DDP ranks (once per epoch); the training loss is not, to avoid a sync per step.
        # The step loss stays out of the progress bar: the bar would read it (.item(), a GPU
        # sync) at every refresh; loggers read it only every log_every_n_steps.
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, add_dataloader_idx=False, sync_dist=sync)
        if stage in self.examples:
            self.examples[stage].update(torch.ones(labels.shape[0], device=labels.device))
            self.log(f"{stage}/examples", self.examples[stage], on_step=False, on_epoch=True, add_dataloader_idx=False)
        for name, value in loss_parts.items():
            self.log(
                f"{stage}/{name}_loss", value, on_step=False, on_epoch=True, add_dataloader_idx=False, sync_dist=sync
            )
        self.log(
            f"{stage}/error", errors, on_step=False, on_epoch=True, prog_bar=stage != "test", add_dataloader_idx=False
        )
        if stage == "train":
            self._check_finite(loss, loss_parts)
        return loss

    def _check_finite(self, loss: Tensor, loss_parts: dict[str, Tensor]) -> None:
        step = self.global_step
        if step % self.nan_check_every == 0 and not bool(torch.isfinite(loss)):
            described = ", ".join(f"{name}={float(value.detach()):.6g}" for name, value in loss_parts.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {self.current_epoch}): loss={float(loss.detach()):.6g} "
                f"[{described}]; checked every {self.nan_check_every} step(s)"
            )

    # ---- Lightning hooks ------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.errors["train_error"])

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val", self.errors["val_error"])

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        names = self.test_set_names()
        if dataloader_idx == 0:
            self._step(batch, "test", self.errors["test_error"])
            return
        name = names[dataloader_idx]
        if name not in self.extra_errors:
            self.extra_errors[name] = error_metric().to(self.device)
        metric = self.extra_errors[name]
        metric.update(top_k_error(self(batch[0]).detach(), batch[1]))
        self.log(
            f"test/{name}_error",
            metric,
            on_step=False,
            on_epoch=True,
            add_dataloader_idx=False,
            metric_attribute=f"extra_errors.{name}",
        )

    def on_fit_start(self) -> None:
        """Under DDP, one random stream per rank: Lightning seeds every rank with the same
        seed (``reset_seed`` when the process group starts), so every rank drew the same
        dropout masks and a global batch had only batch/N distinct ones.  Each rank is
        reseeded here with (seed, rank), after Lightning's reseed and before the first step;
        a single process keeps its stream untouched.  The data's order, shifts and crops
        come from their own seeded hashes, not from this stream, so they do not move."""
        trainer = self.trainer
        if trainer.world_size > 1:
            torch.manual_seed(rank_seed(torch.initial_seed(), trainer.global_rank))

    def test_set_names(self) -> list[str]:
        """Names of the datamodule's test loaders; the first is the dataset's own test split."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, "test_set_names", ["test"]))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what determined the run with its weights, so a resume can be checked."""
        if self.run_signature is not None:
            checkpoint[RUN_SIGNATURE_KEY] = self.run_signature

    def configure_optimizers(self) -> dict[str, Any]:
        """``optim.optimizer`` and ``optim.schedule``, both ``_partial_`` configs (conf/optim/);
        the schedule is stepped every training step."""
        cfg = self.optim_cfg
        if "optimizer" not in cfg:  # a checkpoint from before conf/optim/: Adam with the paper's decay
            cfg = {
                "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": cfg["lr"]},
                "schedule": {
                    "_target_": "capsnet.run.schedules.exponential_decay",
                    "_partial_": True,
                    "rate": cfg["decay_rate"],
                    "steps": cfg["decay_steps"],
                },
            }
        optimizer = instantiate(cfg["optimizer"])(self.parameters())
        scheduler = instantiate(cfg["schedule"])(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
