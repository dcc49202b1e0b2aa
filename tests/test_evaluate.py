"""``python -m melrecon.evaluate``: per-volume metrics equal those ``reconstruct`` writes, the
summary and paired statistics equal independent SciPy computations, and bad inputs are named."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import read_csv
from scipy import stats

from melrecon import evaluate as ev
from melrecon import reconstruct as rc
from melrecon.data.h5 import write_scan


def _layout_file(path: Path, target: np.ndarray, kind: str) -> Path:
    """A layout file whose target is ``target`` (single coil, unit maps: target = F^H k)."""
    from melrecon.data.npfft import fftc_np

    if kind == "volume3d":
        k, maps = fftc_np(target[None], axes=(-2, -1)), np.ones((1, *target.shape), np.complex64)
    else:  # cine (S, T, X, Y): maps (S, C, X, Y)
        k = fftc_np(target[:, None], axes=(-2, -1))
        maps = np.ones((target.shape[0], 1, *target.shape[-2:]), np.complex64)
    return write_scan(path, k, maps, target, kind=kind, source="test")


def _prediction(path: Path, target: np.ndarray, rng, noise: float, zf_noise: float) -> dict[str, float]:
    """A reconstruct-format result with noisy reconstruction / zero-filled images; its metrics
    are computed and stored by reconstruct itself."""
    def noisy(s):
        noise = rng.standard_normal(target.shape) + 1j * rng.standard_normal(target.shape)
        return (target + s * noise).astype(np.complex64)

    recon, zf = noisy(noise), noisy(zf_noise)
    dr = float(np.abs(target).max())
    res = rc.ScanResult(reconstruction=recon, zero_filled=zf, target=target, mask=np.ones(target.shape[-1], np.float32),
                        data_range=dr, acceleration=1.0, acceleration_requested=1.0)
    res.metrics = rc.scan_metrics(recon, zf, target, dr)
    path.parent.mkdir(parents=True, exist_ok=True)
    rc.write_result(path, res, {"kind": "test"})
    return res.metrics


def _target(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.fixture
def study(tmp_path):
    """Targets (3 volumes, 1 cine) and two methods A (less noise) and B, reconstruct format."""
    rng = np.random.default_rng(0)
    stored = {"A": {}, "B": {}}
    for i in range(4):
        kind = "cine" if i == 3 else "volume3d"
        target = _target(rng, (2, 3, 9, 8) if kind == "cine" else (3, 10, 8))
        name = f"scan{i}.h5"
        _layout_file(tmp_path / "targets" / "sub" / name, target, kind)
        stored["A"][name] = _prediction(tmp_path / "A" / name, target, rng, 0.05 + 0.01 * i, 0.5)
        stored["B"][name] = _prediction(tmp_path / "B" / name, target, rng, 0.2, 0.6)
    return tmp_path, stored


def test_evaluate_equals_reconstruct_metrics_and_scipy_statistics(study, capsys):
    root, stored = study
    out = root / "eval"
    assert ev.main(["--target", str(root / "targets"), "--predictions", str(root / "A"), str(root / "B"),
                    "--zero-filled", "--out", str(out)]) == 0
    rows = read_csv(out / "per_volume.csv")
    assert len(rows) == 12
    for row in rows:
        method, name = row["method"], row["file"]
        src = stored["A" if method.startswith("zero-filled") else method][name]
        suffix = "_zf" if method.startswith("zero-filled") else ""
        for k in ev.METRICS:
            assert float(row[k]) == pytest.approx(src[k + suffix], rel=1e-9, abs=1e-12), (method, name, k)

    summary = {r["method"]: r for r in read_csv(out / "summary.csv")}
    assert list(summary) == ["zero-filled (A)", "A", "B"]
    psnr_a = [stored["A"][f"scan{i}.h5"]["psnr"] for i in range(4)]
    psnr_b = [stored["B"][f"scan{i}.h5"]["psnr"] for i in range(4)]
    assert float(summary["A"]["psnr_mean"]) == pytest.approx(np.mean(psnr_a), rel=1e-9)
    assert float(summary["A"]["psnr_std"]) == pytest.approx(np.std(psnr_a, ddof=1), rel=1e-9)
    assert summary["A"]["n"] == "4"

    paired = {(r["a"], r["b"], r["metric"]): r for r in read_csv(out / "paired.csv")}
    assert len(paired) == 3 * 3  # 3 pairs x 3 metrics
    r = paired[("A", "B", "psnr")]
    ci = stats.ttest_rel(psnr_b, psnr_a).confidence_interval(0.95)
    assert float(r["mean_diff"]) == pytest.approx(np.mean(np.subtract(psnr_b, psnr_a)), rel=1e-9)
    assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert float(r["ci_high"]) < 0 and r["n"] == "4"  # B is noisier: clearly lower PSNR

    printed = capsys.readouterr().out
    md = (out / "evaluation.md").read_text()
    assert md in printed and "| A | 4 |" in md and "Paired differences" in md
    assert f"{np.mean(psnr_a):.2f} ± {np.std(psnr_a, ddof=1):.2f}" in md


def test_missing_target_and_bad_shape_are_named_others_scored(study, capsys):
    root, _ = study
    rng = np.random.default_rng(1)
    _prediction(root / "A" / "orphan.h5", _target(rng, (3, 10, 8)), rng, 0.1, 0.2)
    with h5py.File(root / "B" / "scan1.h5", "r+") as f:  # a prediction of the wrong shape
        del f["reconstruction"]
        f["reconstruction"] = np.zeros((3, 10, 9), np.complex64)
    code = ev.main(["--target", str(root / "targets"), "--predictions", str(root / "A"), str(root / "B"),
                    "--out", str(root / "eval")])
    err = capsys.readouterr().err
    assert code == 1
    assert "orphan.h5" in err and "no target" in err
    assert "scan1.h5" in err and "(3, 10, 9)" in err and "(3, 10, 8)" in err
    summary = {r["method"]: r for r in read_csv(root / "eval" / "summary.csv")}
    assert summary["A"]["n"] == "3" and summary["B"]["n"] == "3"  # the volumes both methods have
    assert "B lacks scan1.h5" in err
    paired = read_csv(root / "eval" / "paired.csv")
    assert {r["n"] for r in paired} == {"3"}  # pairs only over the volumes both methods have


def test_cropped_reconstruction_is_scored_on_the_centre_crop(tmp_path, capsys):
    rng = np.random.default_rng(3)
    target = _target(rng, (1, 4, 12, 10))
    _layout_file(tmp_path / "t" / "c.h5", target, "cine")
    crop = target[..., 12 // 2 - 4:12 // 2 + 4, 10 // 2 - 3:10 // 2 + 4]  # (8, 7): start N//2 - n//2
    stored = _prediction(tmp_path / "p" / "c.h5", crop, rng, 0.1, 0.3)
    assert ev.main(["--target", str(tmp_path / "t"), "--predictions", str(tmp_path / "p"),
                    "--out", str(tmp_path / "e")]) == 0
    row = read_csv(tmp_path / "e" / "per_volume.csv")[0]
    assert float(row["psnr"]) == pytest.approx(stored["psnr"], rel=1e-9)
    assert float(row["data_range"]) == pytest.approx(float(np.abs(crop).max()), rel=1e-6)
    assert "centre-cropped" in capsys.readouterr().out


def test_usage_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert ev.main(["--target", str(tmp_path / "nope"), "--predictions", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert ev.main(["--target", str(tmp_path / "empty"), "--predictions", str(tmp_path)]) == 2
    assert "no .h5" in capsys.readouterr().err


def test_paired_difference_edge_cases():
    assert ev.paired_difference([1.0], [3.0]) == {"mean_diff": 2.0, "ci_low": pytest.approx(np.nan, nan_ok=True),
                                                 "ci_high": pytest.approx(np.nan, nan_ok=True), "n": 1}
    d = ev.paired_difference([1.0, np.nan, 2.0, 4.0], [2.0, 5.0, 2.5, 4.0])  # the NaN pair is dropped
    assert d["n"] == 3 and d["mean_diff"] == pytest.approx(0.5)
    assert ev.summarize([2.0, 4.0, np.inf]) == (3.0, pytest.approx(np.sqrt(2.0)), 2)


def test_end_to_end_with_reconstruct_output(tmp_path, data_dir, monkeypatch):
    """A tiny trained run reconstructs a validation file; evaluate reproduces the metrics that
    reconstruct printed into the file."""
    from test_reconstruct import _train_run

    monkeypatch.setenv("MELRECON_DATA_DIR", str(data_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = _train_run(tmp_path / "run", [])
    val = data_dir / "synthetic_cine" / "val"
    assert rc.main([str(run), str(val), "--out", str(tmp_path / "rec")]) == 0
    assert ev.main(["--target", str(val), "--predictions", str(tmp_path / "rec"), "--zero-filled",
                    "--out", str(tmp_path / "e")]) == 0
    for row in read_csv(tmp_path / "e" / "per_volume.csv"):
        with h5py.File(tmp_path / "rec" / row["file"], "r") as f:
            suffix = "_zf" if row["method"].startswith("zero-filled") else ""
            for k in ev.METRICS:
                # reconstruct scores its target after the dataset's normalisation round trip
                # (x / max * max in float32); evaluate reads the file's target: float32 rounding
                assert float(row[k]) == pytest.approx(float(f.attrs[k + suffix]), rel=1e-6)
