"""Issue 11, data half: broken, inconsistent, incomplete or concurrently written files are refused
with one line naming file and field; nothing is dropped or mixed silently.

Each test reproduces one case of the issue (numbered as there) on tiny synthetic files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, TinyCineDataModule, TinyCineDataset, TinyNet, run_train

import melrecon.data.synthetic as synthetic
from melrecon.data.datamodule import KspaceDataModule
from melrecon.data.h5 import LayoutError, read_scan, validate_file, write_scan
from melrecon.data.npfft import ifftc_np, sense_combine_np
from melrecon.data.validate import main as validate_main
from melrecon.metrics import VolumeAccumulator

CINE = dict(accelerations=[4.0], eval_acceleration=4.0, calib=4)
KNEE = dict(slab_size=4, accelerations=[3.0], eval_acceleration=3.0, calib=4)


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory) -> dict[str, Path]:
    """Pristine tiny synthetic sets (cine and knee3d), generated once; tests copy them."""
    base = tmp_path_factory.mktemp("pristine")
    synthetic.generate_dataset(base / "cine", "cine", "tiny", progress=False)
    synthetic.generate_dataset(base / "knee", "knee3d", "tiny", progress=False)
    return {"cine": base / "cine", "knee": base / "knee"}


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a pristine set without its check cache (a test that trains on it writes one)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".melrecon-check.json"))
    return dst


# ---------------------------------------------------------------------- 2: NaN in validation
def test_2_nan_val_file_is_refused_at_setup_naming_file(tiny_sets, tmp_path) -> None:
    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    bad = root / "val" / "cine_val_0000.h5"
    with h5py.File(bad, "r+") as f:
        f["kspace"][0, 0, 0, 3, 3] = np.nan
    dm = KspaceDataModule("cine", root, synthetic=None, **CINE)
    with pytest.raises(LayoutError) as err:
        dm.setup("fit")
    assert str(bad) in str(err.value) and err.value.field == "kspace"


def test_2_non_finite_prediction_or_input_in_validation_names_the_file() -> None:
    from melrecon.lit import ReconModule

    class DivergedNet(TinyNet):
        def forward(self, x0, kspace, maps, mask):
            return super().forward(x0, kspace, maps, mask) * torch.nan

    module = ReconModule(DivergedNet(), optimizer=lambda params: torch.optim.Adam(params, 1e-3))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"non-finite.*vol0\.h5"):
        trainer.validate(module, datamodule=TinyCineDataModule(num_val=2))
    # the accumulator itself refuses a non-finite tile (it would drop out of the mean)
    acc = VolumeAccumulator()
    ds = TinyCineDataset(1)
    item = ds[0]
    with pytest.raises(ValueError, match="vol0.h5"):
        acc.update(item.target[None] * torch.nan, item.target[None], item.max[None], [item.file])


def test_2_num_volumes_equals_the_split() -> None:
    from melrecon.lit import ReconModule

    module = ReconModule(TinyNet(), optimizer=lambda params: torch.optim.Adam(params, 1e-3))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    dm = TinyCineDataModule(num_val=3)
    out = trainer.validate(module, datamodule=dm)[0]
    assert out["val/num_volumes"] == 3.0

    class Listed(TinyCineDataset):  # a split listing 3 files of which only 2 deliver items
        files = ["vol0.h5", "vol1.h5", "vol2.h5"]

    class DropsOne(TinyCineDataModule):
        def val_dataloader(self):
            return torch.utils.data.DataLoader(Listed(2, seed=2), batch_size=1)

    with pytest.raises(ValueError, match="scored 2 of the 3 volumes"):
        trainer.validate(module, datamodule=DropsOne())


# ---------------------------------------------------------------------- 4: physically wrong files
def _fault(path: Path, case: str, other: Path) -> str:
    """Break ``path`` in place as the issue did; return the field the error must name."""
    a, _ = read_scan(path)
    kind = "volume3d" if a["kspace"].ndim == 4 else "cine"
    k, m, t = a["kspace"], a["maps"], a["target"]
    if case == "max_tiny":
        with h5py.File(path, "r+") as f:
            f.attrs["max"] = 1e-6
        return "max"
    if case == "kspace_1e30":
        k = k * np.float32(1e30)
        field = "kspace"
    elif case == "kspace_zero":
        k = np.zeros_like(k)
        t = np.zeros_like(t) + 1e-3  # write_scan needs max > 0; the target is irrelevant here
        field = "kspace"
    elif case == "maps_zero":
        m = np.zeros_like(m)
        field = "maps"
    elif case == "target_other_file":
        t = read_scan(other)[0]["target"]
        field = "target"
    else:
        raise AssertionError(case)
    write_scan(path, k, m, t, kind=kind, source=f"test fault {case}")
    return field


FAULTS = ["max_tiny", "kspace_1e30", "kspace_zero", "maps_zero", "target_other_file"]


@pytest.mark.parametrize("which", ["cine", "knee"])
@pytest.mark.parametrize("case", FAULTS)
def test_4_inconsistent_files_fail_validate_and_setup(tiny_sets, tmp_path, case, which, capsys) -> None:
    root = _copy(tiny_sets[which], tmp_path / which)
    prefix = "cine" if which == "cine" else "knee3d"
    bad = root / "train" / f"{prefix}_train_0001.h5"
    field = _fault(bad, case, root / "val" / f"{prefix}_val_0000.h5")
    with pytest.raises(LayoutError) as err:
        validate_file(bad)
    assert err.value.field == field and str(bad) in str(err.value)
    assert validate_main([str(root)]) == 1
    assert f"{bad}: field '{field}'" in capsys.readouterr().err
    kind, opts = ("cine", CINE) if which == "cine" else ("volume3d", KNEE)
    with pytest.raises(LayoutError, match=f"field '{field}'"):
        KspaceDataModule(kind, root, synthetic=None, **opts).setup("fit")


def test_4_generated_and_chunked_files_pass_the_consistency_check(tiny_sets, tmp_path) -> None:
    for root in tiny_sets.values():
        assert validate_main([str(root)]) == 0
    # a multi-chunk volume: the check runs chunk by chunk and still matches
    src, _ = read_scan(tiny_sets["knee"] / "val" / "knee3d_val_0000.h5")
    big = write_scan(tmp_path / "v.h5", np.concatenate([src["kspace"]] * 5, axis=1),
                     np.concatenate([src["maps"]] * 5, axis=1), np.concatenate([src["target"]] * 5),
                     kind="volume3d", source="test")
    validate_file(big)
    # a target off in one readout position only is still found
    t = np.concatenate([src["target"]] * 5)
    t[17] *= 1.5
    write_scan(big, np.concatenate([src["kspace"]] * 5, axis=1), np.concatenate([src["maps"]] * 5, axis=1), t,
               kind="volume3d", source="test")
    with pytest.raises(LayoutError, match="field 'target'"):
        validate_file(big)


# ---------------------------------------------------------------------- 5: incomplete synthetic set
def test_5_synthetic_folder_with_missing_files_is_refused(tiny_sets, tmp_path) -> None:
    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    gone = root / "train" / "cine_train_0001.h5"
    gone.unlink()
    dm = KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE)
    with pytest.raises(ValueError, match=r"train.* 1 of 2 .*cine_train_0001\.h5.*delete the folder") as err:
        dm.prepare_data()
    assert "refusing" in str(err.value)
    # every file gone (only synthetic.json left): the same refusal, not "folder not empty"
    for p in root.rglob("*.h5"):
        p.unlink()
    with pytest.raises(ValueError, match="refusing"):
        KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE).prepare_data()


# ---------------------------------------------------------------------- 8: reconstruct --out
@pytest.fixture(scope="module")
def cine_run(tmp_path_factory, tiny_sets):
    """A tiny trained cine run (real stack) with a second, different checkpoint beside last.ckpt."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from melrecon.lit import app

    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=tiny", "logger=none",
                                                      f"data.root={tiny_sets['cine']}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        app.run(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k, v in ckpt["state_dict"].items():
        if v.is_floating_point():
            ckpt["state_dict"][k] = v * 1.01
    torch.save(ckpt, run_dir / "checkpoints" / "other.ckpt")
    return run_dir


def _recon(*args) -> int:
    from melrecon import reconstruct as rc

    return rc.main([str(a) for a in args])


def _csv_outputs(out: Path) -> set[str]:
    import csv

    with open(out / "metrics.csv") as fh:
        return {Path(r["output"]).name for r in csv.DictReader(fh)}


def test_8_second_checkpoint_into_one_out_is_refused_unless_overwrite(cine_run, tiny_sets, tmp_path, capsys):
    val = tiny_sets["cine"] / "val"
    test = tiny_sets["cine"] / "test"
    out = tmp_path / "out"
    assert _recon(cine_run, val, "--out", out) == 0
    # same checkpoint, other inputs: metrics.csv lists every result in the folder
    assert _recon(cine_run, test, "--out", out) == 0
    assert _csv_outputs(out) == {"cine_val_0000.h5", "cine_test_0000.h5"}
    capsys.readouterr()
    # another checkpoint: refused, one line, nothing changed
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _recon(cine_run, test, "--out", out, "--ckpt", "other.ckpt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "last.ckpt" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --overwrite: the old checkpoint's results are removed, the folder holds one checkpoint
    assert _recon(cine_run, test, "--out", out, "--ckpt", "other.ckpt", "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.h5")) == ["cine_test_0000.h5"]
    assert _csv_outputs(out) == {"cine_test_0000.h5"}
    with h5py.File(out / "cine_test_0000.h5", "r") as f:
        assert str(f.attrs["checkpoint"]).endswith("other.ckpt")


def test_8_locked_out_folder_is_refused(cine_run, tiny_sets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".melrecon-reconstruct.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        assert _recon(cine_run, tiny_sets["cine"] / "val", "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another reconstruct" in err[0] and str(out) in err[0]
    assert not list(out.glob("*.h5"))


def test_8_metrics_csv_write_failure_is_one_line(cine_run, tiny_sets, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "metrics.csv").mkdir(parents=True)  # os.replace onto a folder fails
    assert _recon(cine_run, tiny_sets["cine"] / "val", "--out", out) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("melrecon: error")]
    assert len(err) == 1 and "metrics.csv" in err[0]


# ---------------------------------------------------------------------- 10: unreadable files
@pytest.mark.parametrize("case", ["zero_byte", "truncated", "not_hdf5"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_10_unreadable_file_is_refused_at_setup_in_one_line(tiny_sets, tmp_path, case, split) -> None:
    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    bad = root / split / f"cine_{split}_0000.h5"
    if case == "zero_byte":
        bad.write_bytes(b"")
    elif case == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("this is not HDF5\n")
    dm = KspaceDataModule("cine", root, synthetic=None, **CINE)
    with pytest.raises(LayoutError) as err:
        dm.setup("fit")
    assert str(bad) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_10_items_of_other_shapes_are_refused_at_setup(tiny_sets, tmp_path) -> None:
    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    bad = root / "train" / "cine_train_0001.h5"
    a, _ = read_scan(bad)
    write_scan(bad, a["kspace"][:, :, :1], a["maps"], a["target"][:, :1], kind="cine", source="1 frame")
    with pytest.raises(ValueError, match=rf"{bad}: field 'kspace'.*\(4, 1, 16, 16\).*\(4, 4, 16, 16\).*batch_size"):
        KspaceDataModule("cine", root, synthetic=None, batch_size=2, **CINE).setup("fit")
    KspaceDataModule("cine", root, synthetic=None, batch_size=1, **CINE).setup("fit")  # batches of one: fine
    # a volume with one readout position: slabs of 4 cannot be cut from it
    kroot = _copy(tiny_sets["knee"], tmp_path / "knee")
    kbad = kroot / "train" / "knee3d_train_0000.h5"
    a, _ = read_scan(kbad)
    write_scan(kbad, a["kspace"][:, :1], a["maps"][:, :1], a["target"][:1], kind="volume3d", source="1 readout")
    with pytest.raises(ValueError, match=rf"{kbad}: field 'kspace'.*slab_size"):
        KspaceDataModule("volume3d", kroot, synthetic=None, batch_size=2, **KNEE).setup("fit")
    # images smaller than the SSIM window in val: refused at set-up, not after an epoch
    vbad = root / "val" / "cine_val_0000.h5"
    a, _ = read_scan(vbad)
    k = a["kspace"][..., 5:11, 5:11]
    m = a["maps"][..., 5:11, 5:11]
    t = sense_combine_np(ifftc_np(k), m[:, :, None], coil_axis=1)
    write_scan(vbad, k, m / np.sqrt((np.abs(m) ** 2).sum(1, keepdims=True)), t, kind="cine", source="small")
    with pytest.raises(ValueError, match=rf"{vbad}.*SSIM"):
        KspaceDataModule("cine", root, synthetic=None, batch_size=1, **CINE).setup("validate")


def test_10_check_is_cached_by_path_size_and_mtime(tiny_sets, tmp_path, monkeypatch) -> None:
    from melrecon.data import check as filecheck

    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    calls: list[str] = []
    real = filecheck.validate_file

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(filecheck, "validate_file", counting)
    filecheck.clear_memory_cache()
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert sorted(calls) == ["cine_train_0000.h5", "cine_train_0001.h5", "cine_val_0000.h5"]
    calls.clear()
    filecheck.clear_memory_cache()  # a new process: the JSON cache in the folder answers
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert calls == []
    # a changed file is checked again (size or mtime differ), and refused if now bad
    bad = root / "train" / "cine_train_0001.h5"
    with h5py.File(bad, "r+") as f:
        f.attrs["max"] = 1e-6
    os.utime(bad, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(LayoutError, match="field 'max'"):
        KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert calls == ["cine_train_0001.h5"]


@pytest.mark.slow  # a train.py subprocess: ~10 s alone, 20 s on a loaded machine
def test_10_train_cli_prints_one_line_naming_the_file(tiny_sets, tmp_path, data_dir) -> None:
    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    bad = root / "val" / "cine_val_0000.h5"
    bad.write_bytes(bad.read_bytes()[:1000])
    res = run_train(["debug=tiny", "logger=none", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"],
                    tmp_path, data_dir)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("melrecon: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "field 'file'" in errors[0]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------- 12: concurrent generation
def test_12_two_generations_at_once_share_one_set(tmp_path, monkeypatch) -> None:
    real = synthetic.write_scan

    def slow(*args, **kwargs):
        time.sleep(0.2)  # widen the window in which both see an empty folder
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_scan", slow)
    root = tmp_path / "cine"
    errors: list[BaseException] = []

    def job() -> None:
        try:
            KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE).prepare_data()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(root.rglob("*.h5"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cine"]  # no temporaries, no lock left


def test_12_stale_temporary_folder_is_cleaned_and_umask_respected(tmp_path) -> None:
    stale = tmp_path / ".cine.tmp_killed"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "cine_train_0000.h5").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        KspaceDataModule("cine", tmp_path / "cine", synthetic={"preset": "tiny", "progress": False},
                         **CINE).prepare_data()
    finally:
        os.umask(old)
    assert not stale.exists()
    for d in [tmp_path / "cine", *(tmp_path / "cine").iterdir()]:
        if d.is_dir():
            assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert stat.S_IMODE((tmp_path / "cine" / "train" / "cine_train_0000.h5").stat().st_mode) == 0o644


def test_4_reconstruct_refuses_an_inconsistent_file(cine_run, tiny_sets, tmp_path, capsys) -> None:
    root = _copy(tiny_sets["cine"], tmp_path / "cine")
    bad = root / "test" / "cine_test_0000.h5"
    _fault(bad, "target_other_file", root / "val" / "cine_val_0000.h5")
    assert _recon(cine_run, bad, "--out", tmp_path / "out") == 1
    assert f"FAILED {bad}: field 'target'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cine_test_0000.h5").exists()


def test_depth_is_recorded_and_one_out_folder_holds_one_depth(cine_run, tiny_sets, tmp_path, capsys):
    """``--num-unrolls 6`` into an --out holding trained-depth results used to mix depths in
    metrics.csv with no record of either."""
    import csv

    from omegaconf import OmegaConf

    val = tiny_sets["cine"] / "val"
    out = tmp_path / "out"
    assert _recon(cine_run, val, "--out", out) == 0
    trained = int(OmegaConf.load(cine_run / ".hydra" / "config.yaml").model.num_unrolls)
    with h5py.File(out / "cine_val_0000.h5", "r") as f:
        assert int(f.attrs["num_unrolls"]) == int(f.attrs["trained_num_unrolls"]) == trained
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    deeper = trained + 4
    assert _recon(cine_run, tiny_sets["cine"] / "test", "--out", out, "--num-unrolls", deeper) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another depth" in err[0] and f"{trained} unrolls" in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # another folder: the depth used is in the attributes and in metrics.csv
    assert _recon(cine_run, val, "--out", tmp_path / "deep", "--num-unrolls", deeper) == 0
    with h5py.File(tmp_path / "deep" / "cine_val_0000.h5", "r") as f:
        assert (int(f.attrs["num_unrolls"]), int(f.attrs["trained_num_unrolls"])) == (deeper, trained)
    with open(tmp_path / "deep" / "metrics.csv") as fh:
        assert [r["num_unrolls"] for r in csv.DictReader(fh)] == [str(deeper)]
