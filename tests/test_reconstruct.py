"""python -m melrecon.reconstruct: trained run -> reconstructions, metrics, robust file handling.

Two tiny runs are trained once per module with the real stack (tiny synthetic presets, 2
unrolls of a 4-channel CNN): a cine run and a knee3d run with slabs of 3 readout positions, so
the 8-position volumes are tiled 3 + 3 + 2 and the stitching (including the short last slab)
is exercised. Each run folder gets the ``.hydra/config.yaml`` Hydra would write (with the
unresolvable ``${hydra:runtime.output_dir}`` left in place, as in a real run).
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import CONF, HANG_GUARD_S, run_train
from torch.utils.data import default_collate

from melrecon import reconstruct as rc
from melrecon.data.h5 import read_scan, write_scan
from melrecon.metrics import VolumeAccumulator, as_slices, ssim_slices, volume_metrics

SLAB = 3  # 8 readout positions -> slabs [0, 3), [3, 6), [6, 8)


def _train_run(run_dir: Path, overrides: list[str]) -> Path:
    """Train a tiny run into ``run_dir`` and save its config as Hydra does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from melrecon.lit import app

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=tiny", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    torch.manual_seed(0)
    app.run(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = "${hydra:runtime.output_dir}"  # what .hydra/config.yaml holds
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """{"cine": run folder, "knee": run folder}, trained on the session's tiny datasets."""
    base = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELRECON_DATA_DIR", str(data_dir))
        mp.setenv("WANDB_MODE", "disabled")
        out = {
            "cine": _train_run(base / "cine", []),
            "knee": _train_run(base / "knee", ["data=synthetic_knee3d", "model=modl3d_slab",
                                               f"data.slab_size={SLAB}"]),
        }
        yield out


@pytest.fixture
def env(data_dir, monkeypatch):
    monkeypatch.setenv("MELRECON_DATA_DIR", str(data_dir))
    return data_dir


def _run_cfg(run: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run / ".hydra" / "config.yaml")


def _reference_module(run: Path):
    """The trained network loaded the Lightning way (independent of melrecon.reconstruct)."""
    import hydra

    from melrecon.lit import ReconModule

    net = hydra.utils.instantiate(_run_cfg(run).model)
    module = ReconModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu",
                                              net=net, optimizer=torch.optim.Adam)
    return module.eval()


def _val_dataset(run: Path, root: Path):
    """The validation dataset the training DataModule builds for the files in ``root/val``."""
    import hydra

    dm = hydra.utils.instantiate(_run_cfg(run).data, root=str(root), synthetic=None)
    dm.setup("validate")
    return dm.datasets["val"]


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def _main(*args) -> int:
    return rc.main([str(a) for a in args])


# ---------------------------------------------------------------------- 3D volumes
def test_volume3d_stitched_slabs_equal_network_on_dataset_items(runs, env, tmp_path, capsys):
    run = runs["knee"]
    src = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"
    out = tmp_path / "out"
    # batch size 2: slabs [0,3) and [3,6) go together, the short [6,8) alone
    assert _main(run, src, "--out", out, "--batch-size", 2) == 0
    arrays, attrs = _read(out / "knee3d_val_0000.h5")
    scan, info = read_scan(src)
    assert arrays["reconstruction"].shape == arrays["zero_filled"].shape == scan["target"].shape == (8, 16, 16)
    assert arrays["reconstruction"].dtype == arrays["zero_filled"].dtype == np.complex64
    assert arrays["mask"].shape == (16, 16) and set(np.unique(arrays["mask"])) == {0.0, 1.0}

    # the reference: the Lightning-loaded module on every item of the validation dataset
    ds = _val_dataset(run, env / "synthetic_knee3d")
    assert [stop - start for _, start, stop in ds.tiles] == [3, 3, 2]
    module = _reference_module(run)
    recon = np.zeros((8, 16, 16), np.complex64)
    zf = np.zeros_like(recon)
    with torch.no_grad():
        for i in range(len(ds)):
            batch = default_collate([ds[i]])
            s, n = int(batch.position), batch.x0.shape[1]
            recon[s:s + n] = module(batch)[0].numpy() * info.max  # undo the per-file normalisation
            zf[s:s + n] = batch.x0[0].numpy() * info.max
            assert np.array_equal(arrays["mask"], batch.mask[0, 0, 0].numpy())
    scale = np.abs(recon).max()
    # batched CG (2 slabs per call) may stop at another iteration than one slab alone
    assert np.abs(arrays["reconstruction"] - recon).max() <= 5e-5 * scale
    assert np.abs(arrays["zero_filled"] - zf).max() <= 1e-6 * scale
    # the network did something: closer to the target than the zero-filled input
    assert attrs["psnr"] > attrs["psnr_zf"] + 3
    assert attrs["kind"] == "volume3d" and attrs["slab_size"] == SLAB
    assert attrs["checkpoint"] == str((run / "checkpoints" / "last.ckpt").resolve())
    assert attrs["source_file"] == str(src.resolve())
    assert attrs["acceleration"] == pytest.approx(arrays["mask"].size / arrays["mask"].sum())
    assert attrs["acceleration_requested"] == 4.0
    assert "knee3d_val_0000.h5" in capsys.readouterr().out  # the table


def test_batch_size_one_is_bitwise_the_network_on_each_item(runs, env, tmp_path):
    run = runs["knee"]
    src = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"
    assert _main(run, src, "--out", tmp_path) == 0
    arrays, _ = _read(tmp_path / "knee3d_val_0000.h5")
    ds = _val_dataset(run, env / "synthetic_knee3d")
    module = _reference_module(run)
    with torch.no_grad():
        for i in range(len(ds)):
            batch = default_collate([ds[i]])
            s, n = int(batch.position), batch.x0.shape[1]
            want = (module(batch)[0].numpy() * ds.infos[0].max).astype(np.complex64)
            np.testing.assert_allclose(arrays["reconstruction"][s:s + n], want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_whole_volume_tiled_equals_untiled_and_differs_from_slabs_at_their_borders(runs, env, tmp_path, capsys):
    """--whole-volume: one network call on the whole 8 x 16 x 16 volume (the Lightning-loaded
    module on the whole-volume item); with --tile (every axis cut) and --dc-chunk it is the
    same to float rounding. The slab-trained run's stitched slabs (3 readout positions) differ
    from it: the CNN sees zero padding at every slab border instead of the neighbouring slab."""
    run = runs["knee"]
    src = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"
    assert _main(run, src, "--out", tmp_path / "whole", "--whole-volume") == 0
    assert _main(run, src, "--out", tmp_path / "tiled", "--whole-volume", "--tile", 3, 5, 7, "--dc-chunk", 3) == 0
    assert _main(run, src, "--out", tmp_path / "slabs") == 0
    (whole, attrs), (tiled, tattrs), (slabs, sattrs) = (_read(tmp_path / d / "knee3d_val_0000.h5")
                                                   for d in ("whole", "tiled", "slabs"))
    assert attrs["slab_size"] == -1 and attrs["tile"] == "None" and tattrs["tile"] == "(3, 5, 7)"
    w, t, sl = whole["reconstruction"], tiled["reconstruction"], slabs["reconstruction"]
    scale = np.abs(w).max()
    assert np.abs(t - w).max() <= 2e-6 * scale  # complex64 rounding (tiles and chunks sum in another order)
    assert np.array_equal(whole["mask"], slabs["mask"]) and np.array_equal(whole["zero_filled"], slabs["zero_filled"])
    # the reference: the module on the dataset's one whole-volume item
    from omegaconf import OmegaConf

    cfg = _run_cfg(run)
    OmegaConf.update(cfg, "data.slab_size", None)
    import hydra

    dm = hydra.utils.instantiate(cfg.data, root=str(env / "synthetic_knee3d"), synthetic=None)
    dm.setup("validate")
    ds = dm.datasets["val"]
    assert len(ds) == 1  # one validation volume
    with torch.no_grad():
        want = _reference_module(run)(default_collate([ds[0]]))[0].numpy() * ds.infos[0].max
    assert np.abs(w - want).max() <= 1e-6 * scale
    # slab stitching: per readout position, the largest difference from the whole volume
    diff = np.abs(sl - w).reshape(8, -1).max(axis=1) / scale
    print("slabs [0,3) [3,6) [6,8) vs whole volume, max |difference| / max |whole| per readout position:",
          " ".join(f"{d:.2e}" for d in diff), f"; tiled vs untiled {np.abs(t - w).max() / scale:.1e}; PSNR whole "
          f"{attrs['psnr']:.2f} dB, tiled {tattrs['psnr']:.2f} dB, slabs {sattrs['psnr']:.2f} dB")
    assert diff.max() > 1e3 * 2e-6  # seams: far above the tiled/untiled rounding
    assert tattrs["psnr"] == pytest.approx(attrs["psnr"], abs=1e-3)


def test_metrics_in_file_and_csv_are_the_projects_metrics(runs, env, tmp_path):
    run = runs["knee"]
    src = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"
    assert _main(run, src, "--out", tmp_path) == 0
    arrays, attrs = _read(tmp_path / "knee3d_val_0000.h5")
    scan, info = read_scan(src)
    assert attrs["data_range"] == pytest.approx(info.max, rel=1e-6)
    t = torch.from_numpy(np.abs(scan["target"]))
    for suffix, name in (("", "reconstruction"), ("_zf", "zero_filled")):
        p = torch.from_numpy(np.abs(arrays[name]))
        assert attrs[f"psnr{suffix}"] == pytest.approx(volume_metrics(p, t, info.max)["psnr"], rel=1e-6)
        assert attrs[f"nmse{suffix}"] == pytest.approx(volume_metrics(p, t, info.max)["nmse"], rel=1e-5)
        assert attrs[f"ssim{suffix}"] == pytest.approx(float(ssim_slices(as_slices(p), as_slices(t), info.max).mean()), rel=1e-6)
    # the validation path (per-tile accumulation in normalised units) gives the same numbers
    ds = _val_dataset(run, env / "synthetic_knee3d")
    module = _reference_module(run)
    acc = {"recon": VolumeAccumulator(), "zf": VolumeAccumulator()}
    with torch.no_grad():
        for i in range(len(ds)):
            b = default_collate([ds[i]])
            acc["recon"].update(module(b), b.target, b.max, list(b.file), b.position)
            acc["zf"].update(b.x0, b.target, b.max, list(b.file), b.position)
    val = {k: v[str(src)] for k, v in ((k, a.compute()) for k, a in acc.items())}
    for m in ("psnr", "ssim", "nmse"):
        assert attrs[m] == pytest.approx(val["recon"][m], rel=1e-4)
        assert attrs[f"{m}_zf"] == pytest.approx(val["zf"][m], rel=1e-5)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["file"] == str(src)
    for key in rc.METRIC_KEYS:
        assert float(rows[0][key]) == pytest.approx(float(attrs[key]), rel=1e-12)


def test_result_round_trips_through_the_file(runs, env, tmp_path):
    """reconstruct_scan's arrays and attributes come back unchanged from write_result's file."""
    run = runs["knee"]
    src = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"
    cfg = _run_cfg(run)
    net = rc.load_network(cfg, run / "checkpoints" / "last.ckpt")
    ds = rc.eval_dataset(rc.data_settings(cfg), [src])
    result = rc.reconstruct_scan(net, ds)
    path = rc.write_result(tmp_path / "r.h5", result, {"checkpoint": "x", "acceleration": result.acceleration})
    arrays, attrs = _read(path)
    for name in ("reconstruction", "zero_filled", "mask"):
        assert np.array_equal(arrays[name], getattr(result, name)), name
    assert {k: attrs[k] for k in rc.METRIC_KEYS} == result.metrics
    assert attrs["checkpoint"] == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
    # and the command line writes the same reconstruction
    assert _main(run, src, "--out", tmp_path / "cli") == 0
    cli, _ = _read(tmp_path / "cli" / "knee3d_val_0000.h5")
    assert np.array_equal(cli["reconstruction"], result.reconstruction)


# ---------------------------------------------------------------------- cine
def _cine_files(data_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A 2-slice cine file (val and test series, the second scaled by 2) and a single series
    without the slice axis, in ``folder/val``."""
    a, _ = read_scan(data_dir / "synthetic_cine" / "val" / "cine_val_0000.h5")
    b, _ = read_scan(data_dir / "synthetic_cine" / "test" / "cine_test_0000.h5")
    two = write_scan(folder / "val" / "two_slices.h5", np.concatenate([a["kspace"], 2 * b["kspace"]]),
                     np.concatenate([a["maps"], b["maps"]]), np.concatenate([a["target"], 2 * b["target"]]),
                     kind="cine", source="test: two slices")
    one = write_scan(folder / "val" / "one_series.h5", a["kspace"][0], a["maps"][0], a["target"][0],
                     kind="cine", source="test: no slice axis")
    return two, one


def test_cine_every_slice_equals_network_on_dataset_items(runs, env, tmp_path):
    run = runs["cine"]
    two, one = _cine_files(env, tmp_path / "cinedata")
    out = tmp_path / "out"
    assert _main(run, tmp_path / "cinedata", "--out", out, "--batch-size", 2) == 0
    res2, attrs2 = _read(out / "two_slices.h5")
    res1, _ = _read(out / "one_series.h5")
    assert res2["reconstruction"].shape == res2["zero_filled"].shape == (2, 4, 16, 16)
    assert res2["mask"].shape == (2, 4, 16)  # (S, T, Y): a ky pattern per slice and frame
    assert res1["reconstruction"].shape == (4, 16, 16) and res1["mask"].shape == (4, 16)
    assert attrs2["data_range"] == pytest.approx(read_scan(two)[1].max, rel=1e-6)

    ds = _val_dataset(run, tmp_path / "cinedata")
    module = _reference_module(run)
    got = {"one_series.h5": res1["reconstruction"][None], "two_slices.h5": res2["reconstruction"]}
    masks = {"one_series.h5": res1["mask"][None], "two_slices.h5": res2["mask"]}
    seen = 0
    with torch.no_grad():
        for i in range(len(ds)):
            b = default_collate([ds[i]])
            name, s = Path(b.file[0]).name, int(b.position)
            vmax = ds.infos[ds.file_index(i)].max
            want = module(b)[0].numpy() * vmax
            assert np.abs(got[name][s] - want).max() <= 1e-4 * np.abs(want).max(), (name, s)
            assert np.array_equal(masks[name][s], b.mask[0, 0, :, 0].numpy())
            seen += 1
    assert seen == 3
    # slice 1 holds the test series at twice the scale: it is reconstructed at that scale
    ratio = np.abs(res2["reconstruction"][1]).max() / np.abs(res2["reconstruction"][0]).max()
    assert 1.5 < ratio < 2.7


# ---------------------------------------------------------------------- failures
def test_bad_files_are_reported_by_name_and_good_ones_written(runs, env, tmp_path, capsys):
    run = runs["cine"]
    good = env / "synthetic_cine" / "val" / "cine_val_0000.h5"
    bad = tmp_path / "bad"
    bad.mkdir()
    truncated = bad / "truncated.h5"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_h5 = bad / "notes.h5"
    not_h5.write_text("not an hdf5 file")
    wrong_kind = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"  # a volume for a cine net
    out = tmp_path / "out"
    code = _main(run, good, bad, wrong_kind, "--out", out)
    err = capsys.readouterr().err
    assert code == 1
    for p in (truncated, not_h5, wrong_kind):
        assert any(ln.startswith("FAILED") and str(p) in ln for ln in err.splitlines()), (p, err)
    assert "field 'kind'" in err and "1 reconstructed, 3 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["cine_val_0000.h5", "metrics.csv"]
    with open(out / "metrics.csv") as f:
        assert [r["file"] for r in csv.DictReader(f)] == [str(good)]


def test_no_partial_output_when_writing_fails(runs, env, tmp_path, monkeypatch, capsys):
    run = runs["cine"]
    two, one = _cine_files(env, tmp_path / "cinedata")
    real = Path.write_bytes

    def failing(self, data):
        # fail half-way through writing one_series.h5's bytes: a full disk
        if self.name.endswith("one_series.h5") and self.name.startswith("."):
            real(self, bytes(memoryview(data)[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "one_series.h5").write_bytes(b"previous result")  # an older result is not clobbered
    assert _main(run, two, one, "--out", out) == 1
    err = capsys.readouterr().err
    assert f"FAILED {one}" in err and "No space left" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "one_series.h5", "two_slices.h5"]
    assert (out / "one_series.h5").read_bytes() == b"previous result"
    assert _read(out / "two_slices.h5")[0]["reconstruction"].shape == (2, 4, 16, 16)


def test_same_stem_twice_is_refused_not_overwritten(runs, env, tmp_path, capsys):
    run = runs["cine"]
    good = env / "synthetic_cine" / "val" / "cine_val_0000.h5"
    other = tmp_path / "copy" / "cine_val_0000.h5"
    other.parent.mkdir()
    shutil.copy(good, other)
    assert _main(run, good, other, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"FAILED {other}" in err and "same file stem" in err
    _, attrs = _read(tmp_path / "out" / "cine_val_0000.h5")
    assert attrs["source_file"] == str(good.resolve())


# ---------------------------------------------------------------------- run, checkpoint and flags
def test_checkpoint_path_ckpt_flag_and_accel_override(runs, env, tmp_path):
    run = runs["cine"]
    src = env / "synthetic_cine" / "val" / "cine_val_0000.h5"
    best = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch_"))
    # a .ckpt inside the run: the config is found above it
    assert _main(best, src, "--out", tmp_path / "a") == 0
    # --ckpt by name, and a different acceleration than the run's eval_acceleration (4)
    assert _main(run, src, "--out", tmp_path / "b", "--ckpt", best.name, "--accel", 2) == 0
    a, attrs_a = _read(tmp_path / "a" / "cine_val_0000.h5")
    b, attrs_b = _read(tmp_path / "b" / "cine_val_0000.h5")
    assert attrs_a["checkpoint"] == attrs_b["checkpoint"] == str(best.resolve())
    assert attrs_a["acceleration_requested"] == 4.0 and attrs_b["acceleration_requested"] == 2.0
    assert attrs_b["acceleration"] == pytest.approx(b["mask"].size / b["mask"].sum())
    assert 1.8 < attrs_b["acceleration"] < 2.2
    assert b["mask"].sum() > a["mask"].sum()
    assert attrs_b["psnr_zf"] > attrs_a["psnr_zf"]  # more samples, better zero-filled image


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("no_ckpt", "no checkpoint"),
    ("mismatch", "does not fit the run's model config"),
    ("bad_accel", "must be > 1, got 0.5"),
    ("bad_mask", "mask_type 'poisson' is not valid for cine"),
    ("whole_and_slab", "--whole-volume and --slab-size exclude each other"),
    ("bad_tile", "--tile 4 4: regularizer.tile [4, 4] needs one entry per convolved axis"),
    ("bad_chunk", "--dc-chunk must be >= 1, got 0"),
])
def test_usage_errors_are_one_line_with_status_2(runs, env, tmp_path, capsys, case, expect):
    from omegaconf import OmegaConf

    run = runs["cine"]
    src = env / "synthetic_cine" / "val" / "cine_val_0000.h5"
    args = [run, src, "--out", tmp_path / "out"]
    if case == "missing":
        args[0] = tmp_path / "nope"
    elif case == "no_ckpt":
        args += ["--ckpt", "nope.ckpt"]
    elif case == "mismatch":  # a config whose network is wider than the checkpoint's
        cfg = _run_cfg(run)
        cfg.model.regularizer.width = 8
        OmegaConf.save(cfg, tmp_path / "wide.yaml")
        args += ["--config", tmp_path / "wide.yaml"]
    elif case == "bad_accel":
        args += ["--accel", "0.5"]
    elif case == "bad_mask":
        args += ["--mask-type", "poisson"]
    elif case == "whole_and_slab":
        args += ["--whole-volume", "--slab-size", "2"]
    elif case == "bad_tile":
        args += ["--tile", "4", "4"]
    elif case == "bad_chunk":
        args += ["--dc-chunk", "0"]
    code = _main(*args)
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("melrecon: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_py_run_folder_then_command_line(tmp_path, data_dir):
    """The documented workflow: python train.py, then python -m melrecon.reconstruct RUN DATA."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    res = run_train(["debug=tiny", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "melrecon.reconstruct", str(run_dir), str(data_dir / "synthetic_cine" / "val"),
           "--out", str(tmp_path / "recon"), "--device", "cpu"]
    out = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cine_val_0000.h5" in out.stdout and "psnr" in out.stdout
    _, attrs = _read(tmp_path / "recon" / "cine_val_0000.h5")
    assert attrs["psnr"] > attrs["psnr_zf"]


def test_num_unrolls_runs_a_shared_weight_network_at_another_depth(runs, env, tmp_path, capsys):
    run = runs["cine"]
    src = env / "synthetic_cine" / "val" / "cine_val_0000.h5"
    trained = int(_run_cfg(run).model.num_unrolls)
    assert _main(run, src, "--out", tmp_path / "a") == 0
    assert _main(run, src, "--out", tmp_path / "b", "--num-unrolls", trained) == 0
    assert _main(run, src, "--out", tmp_path / "c", "--num-unrolls", trained + 3) == 0
    a, b, c = (_read(tmp_path / d / "cine_val_0000.h5")[0]["reconstruction"] for d in "abc")
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert _main(run, src, "--out", tmp_path / "d", "--num-unrolls", 0) == 2
    assert "--num-unrolls 0" in capsys.readouterr().err


# ---------------------------------------------------------------------- masks keyed once
class _ZeroFilled(torch.nn.Module):
    """A 'network' that returns its input A^H y: enough to follow masks through reconstruct."""

    def forward(self, x0, kspace, maps, mask):
        return x0


def test_cine_acceleration_and_masks_are_the_ones_validation_used(tmp_path):
    """eval_acceleration null, several accelerations, several slices per file: reconstruct
    records for every file the acceleration validation sampled it at, and the same masks.

    Validation picks one R per file and one mask per slice; reconstruct once keyed the R by
    slice instead and recorded another R for most multi-slice files."""
    from melrecon.data.datamodule import KspaceDataModule
    from melrecon.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "d", "cine", "tiny", seed=0, progress=False, slices=3, num_train=1,
                     num_val=4, num_test=1)
    dm = KspaceDataModule(kind="cine", root=tmp_path / "d", accelerations=[2.0, 4.0], eval_acceleration=None,
                          calib=2, synthetic=None)
    dm.setup("validate")
    val = dm.datasets["val"]
    requested = set()
    for fi, path in enumerate(val.files):
        items = [val[i] for i in range(len(val)) if val.file_index(i) == fi]
        assert len(items) == 3
        result = rc.reconstruct_scan(_ZeroFilled(), rc.eval_dataset(dm, [path]))
        for s, item in enumerate(items):
            assert np.array_equal(result.mask[s], item.mask[0, :, 0].numpy()), (path, s)
        achieved = [float(item.acceleration) for item in items]
        # the R validation sampled this file at: every slice's mask achieves it (16 ky lines)
        assert max(achieved) == pytest.approx(min(achieved), rel=1e-6)
        assert result.acceleration_requested == pytest.approx(achieved[0], rel=0.05), path
        assert result.acceleration == pytest.approx(achieved[0], rel=1e-6)
        requested.add(result.acceleration_requested)
    assert requested == {2.0, 4.0}  # both accelerations occur among the files


# ---------------------------------------------------------------------- prospective data
def test_num_unrolls_prints_the_trained_depth_metrics_beside(runs, env, tmp_path, capsys):
    run = runs["cine"]
    src = env / "synthetic_cine" / "val" / "cine_val_0000.h5"
    trained = int(_run_cfg(run).model.num_unrolls)
    assert _main(run, src, "--out", tmp_path / "a") == 0
    capsys.readouterr()
    assert _main(run, src, "--out", tmp_path / "c", "--num-unrolls", trained + 3) == 0
    out = capsys.readouterr().out
    _, at_trained = _read(tmp_path / "a" / "cine_val_0000.h5")
    _, deeper = _read(tmp_path / "c" / "cine_val_0000.h5")
    assert f"it was trained with {trained}" in out
    assert f"PSNR {deeper['psnr']:.2f} dB" in out and f"trained depth: PSNR {at_trained['psnr']:.2f} dB" in out
    with open(tmp_path / "c" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["psnr_trained_depth"]) == pytest.approx(float(at_trained["psnr"]), rel=1e-9)


@pytest.mark.parametrize("kind", ["knee", "cine"])
def test_prospective_file_with_stored_mask_equals_retrospective(runs, env, tmp_path, capsys, kind):
    """A file holding only the samples of a mask (and the mask) reconstructs exactly as the
    fully-sampled file undersampled retrospectively with that mask."""
    run = runs[kind]
    src = (env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5" if kind == "knee"
           else env / "synthetic_cine" / "val" / "cine_val_0000.h5")
    assert _main(run, src, "--out", tmp_path / "retro") == 0
    retro, retro_attrs = _read(tmp_path / "retro" / src.name)
    scan, info = read_scan(src)
    pro = tmp_path / "pro_in" / src.name
    write_scan(pro, scan["kspace"], scan["maps"], scan["target"], info.kind, "test: prospective", axes=info.axes,
               mask=retro["mask"])
    with h5py.File(pro, "r") as f:  # the samples outside the mask are not in the file
        k = f["kspace"][()]
    assert np.count_nonzero(k) < np.count_nonzero(scan["kspace"])
    capsys.readouterr()
    assert _main(run, pro, "--out", tmp_path / "pro") == 0
    assert "mask stored in the file" in capsys.readouterr().out
    got, attrs = _read(tmp_path / "pro" / src.name)
    assert np.array_equal(got["mask"], retro["mask"])
    assert np.array_equal(got["reconstruction"], retro["reconstruction"])
    assert np.array_equal(got["zero_filled"], retro["zero_filled"])
    assert attrs["mask_type"] == "stored" and np.isnan(attrs["acceleration_requested"])
    assert attrs["acceleration"] == pytest.approx(retro_attrs["acceleration"])
    for key in rc.METRIC_KEYS:  # the target is in the file, so it is scored as before
        assert attrs[key] == pytest.approx(retro_attrs[key], rel=1e-12)


def test_prospective_file_without_target_has_no_metrics(runs, env, tmp_path, capsys):
    run = runs["knee"]
    src = env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5"
    scan, info = read_scan(src)
    mask = np.zeros(info.shape[2:4], np.float32)
    mask[:, ::2] = 1
    mask[:, 6:10] = 1
    pro = tmp_path / "in" / "noref.h5"
    write_scan(pro, scan["kspace"], scan["maps"], None, "volume3d", "test", mask=mask)
    assert _main(run, pro, "--out", tmp_path / "out", "--format", "h5,nifti") == 0
    out = capsys.readouterr().out
    assert "no target, no metrics" in out and f"R = {mask.size / mask.sum():.2f}" in out
    arrays, attrs = _read(tmp_path / "out" / "noref.h5")
    assert "psnr" not in attrs and not attrs["has_target"]
    assert arrays["reconstruction"].shape == (8, 16, 16) and np.isfinite(arrays["reconstruction"]).all()
    assert (tmp_path / "out" / "noref.nii.gz").is_file()
    with open(tmp_path / "out" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert row["psnr"] == "" and row["mask"].startswith("mask stored")


def test_fastmri_test_file_with_mask_reconstructs(runs, env, tmp_path, capsys):
    """A fastMRI test/challenge-style file (kspace (slices, coils, H, W) with a column mask (W,),
    no maps, no target) reconstructs with ESPIRiT maps from its calibration columns."""
    run = runs["knee"]
    scan, info = read_scan(env / "synthetic_knee3d" / "val" / "knee3d_val_0000.h5")
    nw = info.shape[3]
    mask = np.zeros(nw, np.float32)
    mask[::3] = 1
    mask[nw // 2 - 4:nw // 2 + 4] = 1  # 8 calibration columns
    kspace = scan["kspace"].transpose(1, 0, 2, 3) * mask  # (slices, coils, H, W), unsampled columns zero
    path = tmp_path / "in" / "file_brain_test.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:  # what fastMRI ships: no melrecon attributes
        f.create_dataset("kspace", data=kspace.astype(np.complex64))
        f.create_dataset("mask", data=mask.astype(bool))
        f.attrs["acceleration"] = 3
        f.attrs["num_low_frequency"] = 8
    assert _main(run, path, "--out", tmp_path / "out", "--format", "h5,png") == 0
    out = capsys.readouterr().out
    assert "ESPIRiT" in out and "no target" in out
    arrays, attrs = _read(tmp_path / "out" / "file_brain_test.h5")
    assert arrays["reconstruction"].shape == (8, 16, 16) and np.isfinite(arrays["reconstruction"]).all()
    assert np.array_equal(arrays["mask"], np.broadcast_to(mask, (16, nw)))
    assert attrs["acceleration"] == pytest.approx(nw / mask.sum())
    assert attrs["source_file"] == str(path.resolve())
    assert (tmp_path / "out" / "file_brain_test_planes.png").is_file()
    # the reconstruction is closer to the fully-sampled image than the zero-filled input
    t = np.abs(scan["target"])
    err = {k: np.linalg.norm(np.abs(arrays[k]) - t) for k in ("reconstruction", "zero_filled")}
    assert err["reconstruction"] < err["zero_filled"]


@pytest.mark.parametrize("kind", ["cine", "knee"])
def test_comparison_png_names_what_its_psnr_is_computed_over(runs, env, tmp_path, kind):
    """The comparison PNG's PSNRs are the volume metrics of metrics.csv and say "(volume)";
    its description says which plane or frame the panels show (a figure that silently scored
    frame 0 showed 22.74 dB beside metrics.csv's 22.24)."""
    from PIL import Image

    from melrecon.export import PNG_DESCRIPTION_KEY

    split = env / ("synthetic_cine" if kind == "cine" else "synthetic_knee3d") / "val"
    path = sorted(split.glob("*.h5"))[0]
    out = tmp_path / "out"
    assert _main(runs[kind], path, "--out", out, "--format", "h5,png") == 0
    with open(out / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    text = Image.open(out / f"{path.stem}_comparison.png").info[PNG_DESCRIPTION_KEY]
    assert f"zero-filled PSNR {float(row['psnr_zf']):.2f} dB (volume)" in text, text
    assert f"reconstruction PSNR {float(row['psnr']):.2f} dB (volume)" in text, text
    assert ("centre readout plane" if kind == "knee" else "frame 0 of the centre slice") in text
