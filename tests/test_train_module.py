"""ReconModule and callbacks on stand-ins (TinyNet, TinyCineDataModule): fast, no Hydra."""

import copy
import functools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyCineDataModule, TinyCineDataset, TinyNet
from helpers import column, read_metrics_csv
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import default_collate

from melrecon.lit import (
    LearningRateMonitor,
    NetStatsLogger,
    PeakMemoryMonitor,
    ReconImageLogger,
    ReconLoss,
    ReconModule,
)
from melrecon.metrics import ssim_slices


def make_module(lr=1e-2, **kw):
    pl.seed_everything(0)
    return ReconModule(TinyNet(), functools.partial(torch.optim.Adam, lr=lr), **kw)


def make_trainer(tmp_path, max_epochs=1, callbacks=(), **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="csv"),
                      callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)




def test_logs_fastmri_metrics_peak_memory_and_net_stats(tmp_path):
    module = make_module()
    dm = TinyCineDataModule()
    trainer = make_trainer(tmp_path, callbacks=[PeakMemoryMonitor(), NetStatsLogger()])
    trainer.validate(module, datamodule=dm)  # untrained: recon == x0 + CNN(x0)
    trainer.fit(module, datamodule=dm)
    rows = read_metrics_csv(tmp_path)
    for key in ("train/loss", "val/psnr", "val/ssim", "val/nmse", "val/psnr_zf", "val/num_volumes",
                "train/peak_mem_gib", "train/step_time_s", "dc/lam", "val/ssim_best"):
        assert column(rows, key), f"{key} not logged"
    assert column(rows, "val/num_volumes")[-1] == 2.0
    assert column(rows, "train/peak_mem_gib")[-1] > 0.01  # process RSS on CPU, GiB

    # the logged value is the mean over volumes of the fastMRI per-volume numbers
    module.eval()
    ds = TinyCineDataset(2, seed=2)
    per_vol = {}
    with torch.no_grad():
        for it in ds:
            p, t = module(default_collate([it]))[0].abs().double(), it.target.abs().double()
            d = per_vol.setdefault(it.file, {"p": [], "t": [], "max": float(it.max)})
            d["p"].append(p)
            d["t"].append(t)
    psnrs, ssims = [], []
    for d in per_vol.values():
        p, t = torch.cat(d["p"]), torch.cat(d["t"])
        psnrs.append(10 * math.log10(d["max"] ** 2 / float(((p - t) ** 2).mean())))
        ssims.append(float(ssim_slices(p, t, d["max"]).mean()))
    m = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert math.isclose(m["val/psnr"], np.mean(psnrs), rel_tol=1e-5)
    assert math.isclose(m["val/ssim"], np.mean(ssims), rel_tol=1e-5)


def test_training_beats_zero_filled(tmp_path):
    """The denoising stand-in learns: recon PSNR ends above the zero-filled PSNR."""
    module = make_module(lr=3e-2)
    trainer = make_trainer(tmp_path, max_epochs=15)
    trainer.fit(module, datamodule=TinyCineDataModule(num_train=6))
    m = trainer.callback_metrics
    assert float(m["val/psnr"]) > float(m["val/psnr_zf"]) + 1.0


class _NaNAfter(TinyNet):
    """TinyNet whose output turns NaN from the third call on (a diverging network)."""

    calls = 0

    def forward(self, x0, kspace, maps, mask):
        type(self).calls += 1
        out = super().forward(x0, kspace, maps, mask)
        return out * float("nan") if type(self).calls > 2 else out


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    pl.seed_everything(0)
    module = ReconModule(_NaNAfter(), functools.partial(torch.optim.SGD, lr=1e-2))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match="non-finite training loss .* global step 2"):
        trainer.fit(module, datamodule=TinyCineDataModule(num_train=8, batch_size=1))
    assert all(torch.isfinite(p).all() for p in module.parameters())  # nothing NaN was applied


def test_non_finite_gradient_is_refused():
    module = make_module()
    module.net.lam.grad = torch.tensor(float("inf"))
    with pytest.raises(FloatingPointError, match="net.lam"):
        module.on_before_optimizer_step(None)


def test_resume_restores_step_and_optimizer(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    dm = TinyCineDataModule()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/ssim", mode="max")
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[ckpt_cb])
    module = make_module()
    trainer.fit(module, datamodule=dm)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == trainer.global_step == 8  # 8 items, batch 2, 2 epochs
    assert saved["melrecon"]["best_ssim"] == module.best_ssim

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["opt"] = copy.deepcopy(trainer.optimizers[0].state_dict())  # tensors are live
            seen["best"] = pl_module.best_ssim

    module2 = make_module(lr=1e-2)
    trainer2 = make_trainer(tmp_path / "b", max_epochs=3, callbacks=[Probe()])
    trainer2.fit(module2, datamodule=dm, ckpt_path=str(last))
    assert seen["step"] == 8
    ref = saved["optimizer_states"][0]["state"]
    got = seen["opt"]["state"]
    assert ref.keys() == got.keys() and len(ref) > 0
    for k in ref:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got[k][name], ref[k][name])
    assert seen["best"] == module.best_ssim
    assert trainer2.global_step == 12


def test_image_logger_writes_strips(tmp_path):
    cb = ReconImageLogger(num_items=2, save_dir=str(tmp_path / "img"))
    trainer = make_trainer(tmp_path, callbacks=[cb])
    trainer.fit(make_module(), datamodule=TinyCineDataModule())
    from PIL import Image

    from melrecon import export

    files = sorted((tmp_path / "img").glob("*.png"))
    assert len(files) == 2
    im = np.asarray(Image.open(files[0]))
    # labelled strips (melrecon.export.comparison_strip): a title band over 4 magnified 12x12 panels
    scale = -(-export._MIN_PANEL_PX // 12)
    assert im.shape == (export._TITLE_PX + 12 * scale, 4 * 12 * scale, 3) and im.dtype == np.uint8
    assert im[export._TITLE_PX:].max() > 0 and im[:export._TITLE_PX].max() > 100  # images and titles
    # cine items: the GIF over time is written beside the PNG
    gifs = sorted((tmp_path / "img").glob("*.gif"))
    assert [g.stem for g in gifs] == [f.stem for f in files]
    assert Image.open(gifs[0]).n_frames > 1


def test_loss_options():
    pred = torch.randn(2, 3, 8, 8, dtype=torch.complex64, requires_grad=True)
    tgt = torch.randn(2, 3, 8, 8, dtype=torch.complex64)
    out = ReconLoss(l1=1.0, mse=0.5, ssim=0.2)(pred, tgt, torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(out["loss"], out["l1"] + 0.5 * out["mse"] + 0.2 * out["ssim"])
    # SSIM loss equals 1 - the metric's SSIM for one item
    s = ReconLoss(l1=0, ssim=1.0)(pred[:1], tgt[:1], torch.tensor([3.0]))["ssim"]
    ref = 1 - ssim_slices(pred[0].detach().abs(), tgt[0].abs(), 3.0).mean()
    assert math.isclose(float(s), float(ref), rel_tol=1e-4)
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match="at least one positive"):
        ReconLoss(l1=0)
    with pytest.raises(ValueError, match="module.loss.mse"):
        ReconLoss(mse=-1)
    with pytest.raises(ValueError, match="scheduler_interval"):
        make_module(scheduler_interval="batch")


def test_learning_rate_monitor_logs_train_lr_and_ssim_best_is_the_running_max(tmp_path):
    """Lightning's LearningRateMonitor under the key train/lr (with and without a scheduler);
    val/ssim_best (torchmetrics MaxMetric) is the running maximum of val/ssim."""
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    for name, kw, want in (("plain", {}, [1e-2] * 12), ("step", {"scheduler": sched}, [1e-2] * 4 + [5e-3] * 4 + [2.5e-3] * 4)):
        trainer = make_trainer(tmp_path / name, max_epochs=3, callbacks=[LearningRateMonitor()])
        trainer.fit(make_module(**kw), datamodule=TinyCineDataModule())  # 4 steps per epoch
        rows = read_metrics_csv(tmp_path / name)
        assert column(rows, "train/lr") == pytest.approx(want, rel=1e-12), name
        ssim, best = column(rows, "val/ssim"), column(rows, "val/ssim_best")
        assert len(ssim) == 3 and best == list(np.maximum.accumulate(ssim))
    # without a logger there is nowhere to log: the callback stays out of the way
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[LearningRateMonitor()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(make_module(), datamodule=TinyCineDataModule())
    assert trainer.global_step == 4


def test_module_takes_a_recon_batch():
    module = make_module()
    item = TinyCineDataset(1)[0]
    with pytest.raises(ValueError, match="expected a ReconBatch"):
        module({k: getattr(item, k) for k in item._fields})
