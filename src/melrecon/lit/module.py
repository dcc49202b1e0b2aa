"""ReconModule: the LightningModule that trains any unrolled reconstruction network.

The network is built from the ``model`` config group and passed in; it must have the
signature ``net(x0, kspace, maps, mask) -> image`` (x0's shape, complex) and may offer
``log_stats() -> dict[str, float]`` (logged by :class:`melrecon.lit.callbacks.NetStatsLogger`).

Batches are :class:`melrecon.data.batch.ReconBatch` (fields, shapes and units there).

Logged keys: ``train/loss`` (+ ``train/l1`` ... per loss term), ``val/loss``, and per-volume
fastMRI metrics (:mod:`melrecon.metrics`) of the reconstruction ``val/{psnr,ssim,nmse}`` and of
the zero-filled input ``val/{psnr,ssim,nmse}_zf``, ``val/num_volumes`` (volumes scored, summed
over ranks; equal to the split's volumes whenever the whole split is evaluated, and non-finite
inputs, reconstructions or metrics are errors naming the file, so no volume drops out) and ``val/ssim_best`` (best ``val/ssim`` so far, torchmetrics ``MaxMetric``, kept in
the checkpoint); the same under ``test/`` for ``trainer.test``. ``train/lr`` comes from the
:class:`melrecon.lit.callbacks.LearningRateMonitor` callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from melrecon.data.batch import ReconBatch
from melrecon.lit.losses import ReconLoss
from melrecon.metrics import METRICS, VolumeAccumulator
from melrecon.models.regularizers import BoundedConv


class ReconModule(pl.LightningModule):
    """Train/validate/test an unrolled network with fastMRI per-volume metrics.

    Args:
        net: the reconstruction network (``hydra.utils.instantiate(cfg.model)``).
        optimizer: a partial optimizer constructor, ``optimizer(params=...)``.
        scheduler: optional partial LR scheduler constructor, ``scheduler(optimizer=...)``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        monitor: metric a plateau scheduler watches (default ``val/ssim``).
        loss: loss weights ``{l1, mse, ssim}`` (see :class:`ReconLoss`) or a ReconLoss.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, scheduler_interval: str = "epoch",
                 monitor: str = "val/ssim", loss: Mapping[str, float] | ReconLoss | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"module.net: expected a torch.nn.Module, got {type(net).__name__}")
        if not callable(optimizer):
            raise ValueError("module.optimizer: expected a partial optimizer (set _partial_: true)")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"module.scheduler_interval: 'epoch' or 'step', got {scheduler_interval!r}")
        # only plain values go into the checkpoint's hparams: Lightning loads checkpoints with
        # weights_only=True, which refuses pickled partials and DictConfigs
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler", "loss"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.loss_fn = loss if isinstance(loss, ReconLoss) else ReconLoss(**dict(loss or {"l1": 1.0}))
        self.hparams["loss"] = dict(self.loss_fn.weights)
        self._acc = {"recon": VolumeAccumulator(), "zf": VolumeAccumulator()}
        # per-volume values averaged across volumes and ranks (MeanMetric syncs on compute)
        self.vol_means = nn.ModuleDict({f"{src}_{m}": MeanMetric() for src in ("recon", "zf") for m in METRICS})
        self.vol_count = SumMetric()
        self.ssim_best = MaxMetric()
        # the run's config record (melrecon.lit.runinfo.config_record), set by the app and
        # stored in every checkpoint so that resume and reconstruct can refuse another config
        self.run_record: dict[str, Any] | None = None

    # ------------------------------------------------------------------ forward / steps
    @property
    def best_ssim(self) -> float:
        """The best validation SSIM so far (-inf before the first validation)."""
        return float(self.ssim_best.max_value)

    def forward(self, batch: ReconBatch) -> torch.Tensor:
        """Reconstruct a batch: returns a complex image with the shape of ``batch.x0``."""
        if not isinstance(batch, ReconBatch):
            raise ValueError(f"ReconModule: expected a ReconBatch (melrecon.data.batch), got {type(batch).__name__}")
        return self.net(batch.x0, batch.kspace, batch.maps, batch.mask)

    def training_step(self, batch: ReconBatch, batch_idx: int) -> torch.Tensor:
        pred = self(batch)
        terms = self.loss_fn(pred, batch.target, batch.max)
        if not torch.isfinite(terms["loss"]):
            # stop before the optimizer sees it: a NaN step silently ruins every weight
            raise FloatingPointError(
                f"non-finite training loss {float(terms['loss'])} at global step {self.global_step} "
                f"(files {list(batch.file)}); the last checkpoint is intact: lower "
                "module.optimizer.lr, set trainer.gradient_clip_val, or check these files with "
                "python -m melrecon.data.validate"
            )
        bs = pred.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        for k, v in terms.items():
            if k != "loss":
                self.log(f"train/{k}", v, on_step=True, on_epoch=False, batch_size=bs)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        bad = [n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite gradients at global step {self.global_step} in {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}; the optimizer step was not taken"
            )

    def _eval_step(self, stage: str, batch: ReconBatch) -> dict[str, torch.Tensor]:
        files = list(batch.file)
        self._check_finite(stage, "input", batch, batch.x0, batch.kspace, batch.target, batch.max)
        pred = self(batch)
        # a NaN volume must not drop out of the per-volume means (val/psnr over the others)
        self._check_finite(stage, "reconstruction", batch, pred)
        terms = self.loss_fn(pred, batch.target, batch.max)
        self.log(f"{stage}/loss", terms["loss"], on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=pred.shape[0])
        self._acc["recon"].update(pred, batch.target, batch.max, files, batch.position)
        self._acc["zf"].update(batch.x0, batch.target, batch.max, files, batch.position)
        return {"pred": pred.detach()}

    def _check_finite(self, stage: str, what: str, batch: ReconBatch, *tensors: torch.Tensor) -> None:
        """ValueError naming the files and positions of ``batch`` if any tensor is NaN/Inf."""
        for t in tensors:
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.ndim else t.reshape(1, 1)).all(dim=1)
            if bad.any():
                where = [f"{f} (position {int(p)})" for f, p, b in zip(batch.file, batch.position, bad.tolist()) if b]
                raise ValueError(
                    f"{stage}: non-finite {what} for {', '.join(where)}"
                    + (" (check the file with python -m melrecon.data.validate)" if what == "input"
                       else f" at global step {self.global_step}: the network diverged on this volume")
                )

    def validation_step(self, batch: ReconBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step("val", batch)

    def test_step(self, batch: ReconBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step("test", batch)

    # ------------------------------------------------------------------ per-volume metrics
    def _reset_volumes(self) -> None:
        for acc in self._acc.values():
            acc.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_volumes()

    def on_test_epoch_start(self) -> None:
        self._reset_volumes()

    def _log_volume_metrics(self, stage: str) -> dict[str, float]:
        """Average the per-volume values of this rank's volumes over all ranks, then log them."""
        out: dict[str, float] = {}
        for src, acc in self._acc.items():
            vols = acc.compute()
            for m in METRICS:
                metric = self.vol_means[f"{src}_{m}"]
                metric.reset()
                # weight-0 update: a rank without volumes still joins the sync with zero sums
                metric.update(torch.zeros((), device=self.device), weight=0.0)
                for v in vols.values():
                    metric.update(torch.tensor(v[m], dtype=torch.float32, device=self.device))
                suffix = "" if src == "recon" else "_zf"
                out[f"{stage}/{m}{suffix}"] = float(metric.compute())
            if src == "recon":
                self.vol_count.reset()
                self.vol_count.update(torch.tensor(float(len(vols)), device=self.device))
                out[f"{stage}/num_volumes"] = float(self.vol_count.compute())
                self._check_volume_count(stage, out[f"{stage}/num_volumes"])
        if stage == "val" and not self.trainer.sanity_checking:
            # NaN (no volume scored) is ignored by MaxMetric's default nan_strategy
            self.ssim_best.update(torch.tensor(out["val/ssim"], device=self.device))
            out["val/ssim_best"] = float(self.ssim_best.compute())
        # values are already reduced over ranks and equal on all of them; sync_dist only
        # averages identical numbers (and keeps Lightning's DDP logging check quiet)
        self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True)
        return out

    def _check_volume_count(self, stage: str, scored: float) -> None:
        """When the whole split was evaluated, every volume of it must have been scored: a
        missing one would bias the means without a trace. Datasets that list their ``files``
        (SlabDataset, CineDataset) are checked; partial epochs (``limit_*_batches``) are not."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        limit = trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches
        if not (isinstance(limit, float) and limit == 1.0):
            return
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        files = {f for dl in loaders for f in getattr(getattr(dl, "dataset", None), "files", None) or ()}
        if files and scored != len(files):
            raise ValueError(f"{stage}: scored {scored:g} of the {len(files)} volumes of the split; "
                             "every volume must be scored (is a sampler dropping items?)")

    def on_validation_epoch_end(self) -> None:
        self._log_volume_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_volume_metrics("test")

    def on_train_start(self) -> None:
        """Continue the power iterations of a resumed checkpoint (see on_save_checkpoint)."""
        stored, self._power_iteration = getattr(self, "_power_iteration", {}), {}
        modules = dict(self.net.named_modules())
        for name, u in stored.items():
            m = modules.get(name)
            if isinstance(m, BoundedConv):
                m.u = u.to(device=m.weight.device, dtype=m.weight.dtype)
                m._keep_loaded_sigma = False  # sigma and u belong together again

    # ------------------------------------------------------------------ optimisation
    def setup(self, stage: str) -> None:
        check_precision(self.net, str(self.trainer.precision) if self._trainer is not None else "32-true")

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval,
                                                   "monitor": self.monitor, "frequency": 1}}

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the best SSIM, the W&B run id and the run's config record (model, its hash,
        data, module, seed): a resumed run continues the first two and is checked against the last."""
        extra: dict[str, Any] = {"best_ssim": self.best_ssim}
        if self.run_record is not None:
            extra["config"] = self.run_record
        try:
            from pytorch_lightning.loggers import WandbLogger

            for lg in self.loggers:
                if isinstance(lg, WandbLogger) and lg.version:
                    extra["wandb_id"] = lg.version
        except ImportError:  # pragma: no cover - wandb is a dependency
            pass
        # the spectral-norm power-iteration vectors: not in the state dict (their shape follows the
        # data), but a resumed run must continue them to train exactly as the uninterrupted one
        extra["power_iteration"] = {name: m.u.detach().cpu().clone() for name, m in self.net.named_modules()
                                    if isinstance(m, BoundedConv) and m.u.numel() > 0}
        checkpoint["melrecon"] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # applied at train start: loading the state dict (after this hook) resets them
        self._power_iteration = dict(checkpoint.get("melrecon", {}).get("power_iteration", {}))
        self.ssim_best.reset()
        best = float(checkpoint.get("melrecon", {}).get("best_ssim", -math.inf))
        if math.isfinite(best):
            self.ssim_best.update(torch.tensor(best, device=self.ssim_best.max_value.device))


SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
"""``trainer.precision`` values melrecon runs: float32 (complex64 images), or float32 weights with
the CNNs under autocast. The "true" precisions (``64``, ``bf16-true``, ``16-true``) cast the
weights only: the k-space, maps and images stay complex64 and the first layer fails on the mix."""
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed", "half": "16-true",
                      "double": "64-true", "float": "32-true"}


def check_precision_name(precision: Any) -> str:
    """The Lightning name of ``trainer.precision`` (``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``);
    ValueError naming the supported ones for any other (:data:`SUPPORTED_PRECISIONS`)."""
    raw = "32" if precision is None else str(precision)
    name = _PRECISION_ALIASES.get(raw, raw)
    if name not in SUPPORTED_PRECISIONS:
        raise ValueError(f"trainer.precision={raw} is not supported; supported: 32 (32-true), bf16-mixed, 16-mixed "
                         "(the networks compute on complex64 images; a 'true' 64/16-bit precision would cast "
                         "the weights only)")
    return name


def check_precision(net: nn.Module, precision: str) -> None:
    """Refuse what does not work: a precision outside :data:`SUPPORTED_PRECISIONS`, and
    ``memory=mel`` of a network whose inverse is iterative (``exact_inverse`` False: MoDL) with
    16-bit autocast (``bf16-mixed``, ``16-mixed``). Its fixed-point inverse stalls above the float32 tolerance on bfloat16
    CNN outputs (about 6e-5 relative), so every MEL step would recompute the chain by a forward
    pass: checkpoint memory at more than checkpoint cost, with a warning per step.
    """
    precision = check_precision_name(precision)
    if "16" not in precision or getattr(net, "memory", None) != "mel" or getattr(net, "exact_inverse", True):
        return
    raise ValueError(
        f"trainer.precision={precision} with model.memory=mel: {type(net).__name__}'s fixed-point inverse cannot "
        "reach its tolerance on 16-bit CNN outputs; use model.memory=checkpoint, trainer.precision=32, or a "
        "reversible network (model=rev_cine / rev3d_slab), which inverts exactly under autocast")
