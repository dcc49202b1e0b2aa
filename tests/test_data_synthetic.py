"""Synthetic generators: determinism, physics consistency, noise level, beating heart, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from melrecon.data.h5 import find_files, read_scan, validate_file
from melrecon.data.npfft import ifftc_np
from melrecon.data.phantoms import cardiac_waveform, cine_series, knee_volume
from melrecon.data.synthetic import PRESETS, generate_dataset, main, make_cine_case, make_knee_case


def test_tiny_presets_are_small_and_valid(tmp_path: Path) -> None:
    """What makes the tests' datasets cheap: four files of the tiny shapes, one case each.

    (A wall-clock bound here failed on a loaded machine; the work done is what is checked.)"""
    generate_dataset(tmp_path / "k", "knee3d", "tiny", progress=False)
    generate_dataset(tmp_path / "c", "cine", "tiny", progress=False)
    tiny = {"volume3d": (4, 8, 16, 16), "cine": (1, 4, 4, 16, 16)}  # coils, X, Y, Z / slices, coils, T, X, Y
    for kind, root in (("volume3d", tmp_path / "k"), ("cine", tmp_path / "c")):
        files = find_files(root)
        assert len(files) == 4 and {p.parent.name for p in files} == {"train", "val", "test"}
        infos = [validate_file(p) for p in files]
        assert all(info.kind == kind and info.shape == tiny[kind] for info in infos)
        # k-space, maps and target in complex64 (knee: 64 + 64 + 16 KiB) plus HDF5 overhead
        assert all(p.stat().st_size < 200_000 for p in files)


def test_cases_are_seeded_and_independent_of_count(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", "cine", "tiny", seed=5, progress=False)
    generate_dataset(tmp_path / "b", "cine", "tiny", seed=5, progress=False, num_train=3)
    generate_dataset(tmp_path / "c", "cine", "tiny", seed=6, progress=False)
    a, _ = read_scan(tmp_path / "a" / "train" / "cine_train_0001.h5")
    b, _ = read_scan(tmp_path / "b" / "train" / "cine_train_0001.h5")
    c, _ = read_scan(tmp_path / "c" / "train" / "cine_train_0001.h5")
    assert np.array_equal(a["kspace"], b["kspace"])
    assert not np.allclose(a["kspace"], c["kspace"])
    v, _ = read_scan(tmp_path / "a" / "val" / "cine_val_0000.h5")
    assert not np.allclose(a["target"], v["target"])  # splits differ


def test_physics_consistency_and_noise_level() -> None:
    case = make_knee_case((6, 24, 20), 4, 20.0, 3)
    clean = make_knee_case((6, 24, 20), 4, 0.0, 3)  # same seed, no noise
    maps, k = case["maps"], case["kspace"]
    assert np.allclose((np.abs(maps) ** 2).sum(0), 1.0, atol=1e-5)
    assert np.allclose(case["target"], (np.conj(maps) * ifftc_np(k)).sum(0), atol=1e-5)
    noise = case["target"] - clean["target"]
    img = np.abs(clean["target"])
    sigma = img[img > 0.1 * img.max()].mean() / 20.0
    assert np.std(noise) == pytest.approx(sigma, rel=0.1)
    cine = make_cine_case((20, 16), 5, 2, 4, 30.0, 0.02, 0)
    assert cine["kspace"].shape == (2, 4, 5, 20, 16) and cine["maps"].shape == (2, 4, 20, 16)
    assert np.allclose(cine["target"], (np.conj(cine["maps"][:, :, None]) * ifftc_np(cine["kspace"])).sum(1), atol=1e-5)


def test_heart_beats_and_knee_has_structure() -> None:
    w = cardiac_waveform(np.linspace(0, 2, 41))
    assert w.min() >= 0 and w.max() <= 1 and np.allclose(w[:21], w[20:])  # periodic, one per cycle
    series = np.abs(cine_series(12, (64, 64), np.random.default_rng(0), respiration=0.0))
    blood = (series > 0.9).sum(axis=(1, 2))  # LV + RV blood pool area per frame
    assert blood.max() > 1.3 * blood.min()  # contracts in systole
    assert not np.allclose(series[0], series[6])
    vol = np.abs(knee_volume((16, 32, 32), np.random.default_rng(0)))
    levels = np.histogram(vol[vol > 0.02], bins=10)[0]
    assert (levels > 0.02 * levels.sum()).sum() >= 4  # several tissue classes, not a binary mask


def test_cli_and_presets(tmp_path: Path, capsys) -> None:
    assert main(["cine", str(tmp_path / "out"), "--preset", "tiny", "--num-train", "1", "--frames", "3"]) == 0
    files = find_files(tmp_path / "out")
    assert len(files) == 3 and validate_file(files[0]).shape[2] == 3
    assert main(["cine", str(tmp_path / "out"), "--preset", "tiny"]) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err
    assert set(PRESETS["knee3d"]) == set(PRESETS["cine"]) == {"tiny", "small", "medium"}
    with pytest.raises(ValueError, match="preset"):
        generate_dataset(tmp_path / "x", "cine", "huge")
    with pytest.raises(ValueError, match="unknown synthetic option"):
        generate_dataset(tmp_path / "x", "cine", "tiny", slab=3)


def test_phantom_version_2_is_opt_in_and_adds_through_plane_detail():
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from melrecon.data.phantoms import cine_series, knee_volume
    from melrecon.data.synthetic import resolve_preset

    # not given: the dataset identity (synthetic.json) of existing folders is unchanged
    assert "phantom_version" not in resolve_preset("knee3d", "small")
    assert resolve_preset("knee3d", "small", {"phantom_version": 2})["phantom_version"] == 2
    with pytest.raises(ValueError, match="phantom_version"):
        resolve_preset("cine", "tiny", {"phantom_version": 3})
    v1 = np.abs(knee_volume((20, 48, 40), np.random.default_rng(5)))
    assert np.array_equal(v1, np.abs(knee_volume((20, 48, 40), np.random.default_rng(5), version=1)))
    v2 = np.abs(knee_volume((20, 48, 40), np.random.default_rng(5), version=2))

    def fine(v):  # in-plane (Y, Z) detail finer than ~1.5 pixels
        return v - gaussian_filter(v, sigma=(0, 1.5, 1.5))

    added = fine(v2) - fine(v1)  # the detail version 2 adds
    assert np.linalg.norm(added) > 0.5 * np.linalg.norm(fine(v1))  # measured 0.85-1.1 (seeds 5-7)
    # and it continues from one readout plane to the next (edges of v1: 0.52; measured 0.76-0.78)
    corr = np.corrcoef(added[:-1].ravel(), added[1:].ravel())[0, 1]
    assert corr > 0.7, corr
    c1 = np.abs(cine_series(8, (48, 48), np.random.default_rng(2), version=1))
    c2 = np.abs(cine_series(8, (48, 48), np.random.default_rng(2), version=2))
    assert np.linalg.norm(fine(c2) - fine(c1)) > 0.2 * np.linalg.norm(fine(c1))  # measured 0.29-0.38


def test_generation_says_how_many_files_and_where(tmp_path: Path, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="melrecon"):
        generate_dataset(tmp_path / "cine", "cine", preset="tiny", progress=False)
    n = sum(len(list((tmp_path / "cine" / s).glob("*.h5"))) for s in ("train", "val", "test"))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("generating a synthetic"))
    assert f": {n} files (" in line and line.endswith(f"into {tmp_path / 'cine'}; later runs reuse it")
