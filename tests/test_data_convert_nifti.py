"""Magnitude volumes (NIfTI) to simulated multi-coil k-space: the converter and melrecon.data.simulate.

The test volume is written here: a textured ellipsoid whose intensity rises along A (so the
readout axis can be told from the data), with a little noise so that its spectrum reaches the
band edge like a measured image's.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from melrecon.data.convert.nifti import (
    NiftiOptions,
    band_limit_ratios,
    convert_nifti,
    main as nifti_main,
)
from melrecon.data.h5 import validate_file
from melrecon.data.npfft import fftc_np, ifftc_np
from melrecon.data.simulate import add_noise, coil_maps, noise_std, simulate_kspace, smooth_phase

VOXEL = (1.0, 1.25, 1.5)  # R, A, S: different per axis, so the stored voxel order shows the axis order


def _volume(shape=(40, 36, 30), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (grid[0] / 0.8) ** 2 + (grid[1] / 0.75) ** 2 + (grid[2] / 0.7) ** 2 < 1
    vol = inside * (1.0 + 0.5 * grid[1]) * (1 + 0.2 * rng.standard_normal(shape))  # brighter anteriorly
    return np.clip(vol + 0.02 * np.abs(rng.standard_normal(shape)), 0, None)


def _write_nifti(path: Path, vol: np.ndarray, voxel=VOXEL) -> Path:
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([*voxel, 1.0])), str(path))  # RAS
    return path


def _arrays(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f} | {"attrs": dict(f.attrs)}


def test_round_trip_shape_voxel_readout_snr_maps_target(tmp_path: Path) -> None:
    """Voxel size and axis order as asked, SNR within 10 %, unit maps, target = S^H F^H k, valid."""
    src = _write_nifti(tmp_path / "head.nii.gz", _volume())
    opts = dict(voxel_mm=(2.0, 2.5, 3.0), readout="A", margin_mm=4.0, coils=4, seed=3)
    noisy = convert_nifti([src], tmp_path / "snr30", NiftiOptions(snr=30.0, **opts), progress=False)
    convert_nifti([src], tmp_path / "clean", NiftiOptions(snr=0.0, **opts), progress=False)
    a, c = _arrays(tmp_path / "snr30" / "head.h5"), _arrays(tmp_path / "clean" / "head.h5")
    entry = noisy["inputs"][0]

    # shape: the resampled, cropped volume with A first (the readout X), then R, S
    box = entry["resampled_box"]
    assert entry["xyz_from_file_axes"] == [1, 0, 2]
    assert a["kspace"].shape == (4, box[1][1] - box[1][0], box[0][1] - box[0][0], box[2][1] - box[2][0])
    np.testing.assert_allclose(a["attrs"]["voxel_size_mm"], (2.5, 2.0, 3.0), rtol=0.05)
    assert a["attrs"]["readout"] == "A"
    profile = np.abs(c["target"]).mean(axis=(1, 2))  # X runs posterior -> anterior: brighter
    assert profile[len(profile) // 2 + 2] > profile[len(profile) // 2 - 2]

    # SNR: same seed, same phase and maps; the difference is the noise alone
    noise = a["kspace"] - c["kspace"]
    mag = np.abs(c["target"])
    measured = mag[mag > 0.1 * mag.max()].mean() / np.sqrt(np.mean(np.abs(noise) ** 2))
    assert abs(measured / 30.0 - 1) < 0.10, measured

    np.testing.assert_allclose(np.sum(np.abs(a["maps"]) ** 2, axis=0), 1.0, atol=1e-5)
    target = np.sum(np.conj(a["maps"]) * ifftc_np(a["kspace"], axes=(-2, -1)), axis=0)
    np.testing.assert_allclose(a["target"], target, atol=1e-5 * np.abs(target).max())
    assert validate_file(tmp_path / "snr30" / "head.h5", check_values=True).kind == "volume3d"

    manifest = json.loads((tmp_path / "snr30" / "manifest.json").read_text())
    assert manifest["options"]["seed"] == 3 and manifest["options"]["snr"] == 30.0
    assert len(entry["sha256"]) == 64 and entry["outputs"][0]["noise_seed"] == [3, 0, 1]
    again = convert_nifti([src], tmp_path / "again", NiftiOptions(snr=30.0, **opts), progress=False)
    assert again["inputs"][0]["noise_std"] == entry["noise_std"]
    np.testing.assert_array_equal(_arrays(tmp_path / "again" / "head.h5")["kspace"], a["kspace"])


def test_blocks_splits_and_espirit_maps_from_the_cli(tmp_path: Path, capsys) -> None:
    src = _write_nifti(tmp_path / "head.nii", _volume())
    out = tmp_path / "blocks"
    rc = nifti_main([str(src), str(out), "--voxel-mm", "2", "--blocks", "2", "--readout", "S", "--coils", "4",
                     "--split-pattern", "train,test", "--maps", "espirit", "--calib", "12"])
    assert rc == 0, capsys.readouterr().err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.h5"))
    assert files == ["test/head_b01.h5", "train/head_b00.h5"]
    infos = [validate_file(out / f, check_values=True) for f in files]
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["inputs"][0]
    assert entry["grid"] == [1, 1, 2] and manifest["options"]["maps"] == "espirit"
    sx = entry["resampled_box"][2][1] - entry["resampled_box"][2][0]
    assert all(info.shape[1] == sx // 2 for info in infos)  # halves of the readout (S) extent
    assert [o["origin_voxel"][2] for o in entry["outputs"]] == [entry["resampled_box"][2][0],
                                                                 entry["resampled_box"][2][0] + sx // 2]

    assert nifti_main([str(src), str(out)]) == 1  # not empty: refused, nothing changed
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.h5")) == files


def _zero_padded(vol: np.ndarray, factor: int = 2) -> np.ndarray:
    """``vol`` sinc-interpolated by ``factor`` (its spectrum zero-padded), as magnitude."""
    spec = fftc_np(vol.astype(np.complex128), axes=(0, 1, 2))
    pad = [((factor - 1) * n // 2, (factor - 1) * n - (factor - 1) * n // 2) for n in vol.shape]
    return np.abs(ifftc_np(np.pad(spec, pad), axes=(0, 1, 2)))


def test_zero_padded_or_upsampled_volumes_are_refused(tmp_path: Path) -> None:
    vol = _volume((24, 22, 20))
    fine = _write_nifti(tmp_path / "padded.nii.gz", _zero_padded(vol), voxel=(1.0, 1.0, 1.0))
    assert min(min(r) for r in band_limit_ratios(vol, (1, 1, 1), (1, 1, 1))) > 0.3  # the source is resolved
    with pytest.raises(ValueError, match="zero-padded in k-space or upsampled"):
        convert_nifti([fine], tmp_path / "out", NiftiOptions(coils=2), progress=False)
    assert not (tmp_path / "out").exists()
    # at the resolution it really has, the same file passes
    convert_nifti([fine], tmp_path / "coarse", NiftiOptions(voxel_mm=(2.0, 2.0, 2.0), coils=2), progress=False)
    with pytest.warns(UserWarning, match="zero-padded"):
        convert_nifti([fine], tmp_path / "allowed", NiftiOptions(coils=2, allow_band_limited=True), progress=False)
    with pytest.raises(ValueError, match="finer than the file's"):
        convert_nifti([fine], tmp_path / "up", NiftiOptions(voxel_mm=(0.5, 1.0, 1.0), coils=2), progress=False)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="lossy formats"):
        convert_nifti([tmp_path / "photo.jpg"], tmp_path / "jpg", NiftiOptions(coils=2), progress=False)


def test_simulate_api_noise_maps_and_phase() -> None:
    rng = np.random.default_rng(0)
    image = _volume((12, 16, 14)) * np.exp(1j * smooth_phase((12, 16, 14), rng, 1.0, correlation=3.0))
    maps = coil_maps(image.shape, 4, rng, ring_axis=2)
    np.testing.assert_allclose(np.sum(np.abs(maps) ** 2, axis=0), 1.0, atol=1e-12)
    clean = simulate_kspace(image, maps, None, np.random.default_rng(1))
    noisy = simulate_kspace(image, maps, 20.0, np.random.default_rng(1))
    sigma = np.sqrt(np.mean(np.abs(noisy["kspace"] - clean["kspace"]) ** 2))
    assert abs(sigma / noise_std(image, 20.0) - 1) < 0.05
    np.testing.assert_allclose(clean["target"], image, atol=1e-10)  # S^H S = 1: the image itself
    k = np.zeros(3, complex)
    assert add_noise(k, np.ones(3), 0, rng) is k  # snr 0: noiseless


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn (melrecon[brain]) not installed")
def test_brain_study_dataset_builds(tmp_path: Path) -> None:
    """`melrecon brain3d`: 10 / 4 / 4 volumes of 27 x 40 x 32, mirrored blocks in one split."""
    from melrecon.data.brain3d import build

    manifest = build(tmp_path / "brain3d", progress=False)
    outputs = manifest["inputs"][0]["outputs"]
    assert [sum(o["split"] == s for o in outputs) for s in ("train", "val", "test")] == [10, 4, 4]
    assert {tuple(o["shape_xyz"]) for o in outputs} == {(27, 40, 32)}
    for left in outputs[:9]:  # cell (0, a, s) and its mirror image (1, a, s)
        right = outputs[left["block"] + 9]
        assert right["cell"][1:] == left["cell"][1:] and right["split"] == left["split"]
    info = validate_file(tmp_path / "brain3d" / outputs[0]["file"], check_values=True)
    assert info.shape == (8, 27, 40, 32)


def test_brain3d_default_folder_follows_melrecon_data_dir(monkeypatch, tmp_path: Path) -> None:
    """`melrecon brain3d` without a folder writes where `data=brain3d` reads: MELRECON_DATA_DIR
    moves both (fault: it wrote ./data/brain3d, and the study built a second copy)."""
    from melrecon.data import brain3d

    monkeypatch.delenv("MELRECON_DATA_DIR", raising=False)
    assert brain3d.default_out() == Path("data/brain3d")
    monkeypatch.setenv("MELRECON_DATA_DIR", str(tmp_path))
    assert brain3d.default_out() == tmp_path / "brain3d"
    called = {}
    monkeypatch.setattr(brain3d, "build", lambda out, **kw: called.setdefault("out", out) and {"inputs": []})
    assert brain3d.main([]) == 0 and called["out"] == tmp_path / "brain3d"


def test_study_runs_on_the_brain_dataset_with_data_brain3d(monkeypatch) -> None:
    """`melrecon study knee3d_vs_2d data=brain3d`: every run trains on data/brain3d (whole volumes,
    no synthetic generation), same budget, results in a folder of their own."""
    from melrecon.study.config import check_same_budget, compose_study, compose_train, run_specs

    monkeypatch.setenv("MELRECON_ROOT", str(Path(__file__).resolve().parents[1]))
    knee = compose_study("knee3d_vs_2d", ["preset=cpu"])
    cfg = compose_study("knee3d_vs_2d", ["preset=cpu", "data=brain3d"])
    assert cfg.preset.synthetic is None and cfg.out_dir == f"{knee.out_dir}-brain3d"
    runs = {s.name: compose_train(s.overrides) for s in run_specs(cfg)}
    assert set(runs) == {"net3d", "net2d_width", "net2d_params"}
    for run in runs.values():
        assert run.data.root.endswith("/brain3d") and run.data.slab_size is None and run.data.synthetic is None
        assert run.data.calib == 10
    check_same_budget(runs)
    # the tiny preset's debug=smoke sets data.synthetic: it must not turn data/brain3d into tiny knees
    tiny = compose_study("knee3d_vs_2d", ["preset=tiny", "data=brain3d"])
    for spec in run_specs(tiny):
        run = compose_train(spec.overrides)
        assert run.data.synthetic is None and run.data.build == "melrecon.data.brain3d.build"


def test_two_inputs_with_one_name_are_refused_not_overwritten(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        _write_nifti(tmp_path / "in" / sub / "t1.nii", _volume((24, 22, 20), seed=len(sub)))
    assert nifti_main([str(tmp_path / "in"), str(tmp_path / "out"), "--coils", "2", "--voxel-mm", "2"]) == 1
    assert not (tmp_path / "out").exists()


def test_melrecon_convert_nifti_help_shows_its_own_options(capsys) -> None:
    from melrecon.cli import main as melrecon

    assert melrecon(["convert", "nifti", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: melrecon convert nifti") and "--voxel-mm" in out and "(default: 30.0)" in out
    assert melrecon(["convert", "--help"]) == 0
    assert "nifti" in capsys.readouterr().out


BUILDS: list[Path] = []


def build_tiny(root: Path) -> None:
    """A `data.build` function for the test below: three blocks along the readout, one per split."""
    BUILDS.append(Path(root))
    src = _write_nifti(Path(f"{root}.nii"), _volume((24, 30, 20)), voxel=(1.0, 1.0, 1.0))
    convert_nifti([src], root, NiftiOptions(blocks=3, readout="A", coils=2, split_pattern=("train", "val", "test")),
                  progress=False)


def test_datamodule_builds_a_missing_root_once_with_data_build(tmp_path: Path) -> None:
    from melrecon.data.datamodule import KspaceDataModule

    def module(**kw):
        return KspaceDataModule(kind="volume3d", root=tmp_path / "ds", slab_size=None, accelerations=[2], calib=4, **kw)

    with pytest.raises(ValueError, match="missing or holds no .h5 files"):
        module().prepare_data()
    with pytest.raises(ValueError, match="data.synthetic and data.build are both set"):
        module(build=f"{__name__}.build_tiny", synthetic={"preset": "tiny"})
    with pytest.raises(ValueError, match="no such function"):
        module(build="melrecon.data.nothing.build").prepare_data()
    BUILDS.clear()
    dm = module(build=f"{__name__}.build_tiny")
    dm.prepare_data()
    dm.prepare_data()  # built: not again
    assert BUILDS == [tmp_path / "ds"]
    dm.setup("fit")
    item = dm.datasets["train"][0]
    whole = validate_file(dm.split_files("train")[0]).shape[1:]
    assert tuple(item.target.shape) == whole and len(dm.datasets["val"]) == 1  # one item: the whole volume
