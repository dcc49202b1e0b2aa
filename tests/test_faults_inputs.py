"""Faults in what melrecon reads: a file in two splits of a dataset; Siemens twix files whose
header, MDH counters and data disagree about the k-space centre."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from melrecon.data import check, synthetic
from melrecon.data.datamodule import KspaceDataModule
from melrecon.data.h5 import LayoutError

CINE = dict(accelerations=[4.0], eval_acceleration=4.0, calib=4)


@pytest.fixture(scope="module")
def tiny_cine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "cine"
    synthetic.generate_dataset(root, "cine", "tiny", progress=False)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(check.CACHE_NAME))
    return dst


# ---------------------------------------------------------------------- a file in two splits
def test_synthetic_folder_with_an_extra_file_is_refused(tiny_cine, tmp_path):
    """A test file copied into train/ used to be trained on (num_train said 2, 3 files used)."""
    root = _copy(tiny_cine, tmp_path / "cine")
    shutil.copy(root / "test" / "cine_test_0000.h5", root / "train" / "extra.h5")
    dm = KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE)
    with pytest.raises(ValueError, match=r"train holds 1 file\(s\) that synthetic.json does not list \(train/extra\.h5\)"):
        dm.prepare_data()


@pytest.mark.parametrize("how", ["copy", "split_file"])
def test_a_file_whose_content_is_in_two_splits_is_refused(tiny_cine, tmp_path, how):
    """Any dataset (no synthetic marker): the same content in train and test is an error naming both."""
    root = _copy(tiny_cine, tmp_path / "cine")
    (root / "synthetic.json").unlink()
    kwargs = dict(CINE)
    if how == "copy":
        shutil.copy(root / "test" / "cine_test_0000.h5", root / "train" / "renamed.h5")
    else:  # split files listing the same file twice
        (root / "train.txt").write_text("train/cine_train_0000.h5\ntest/cine_test_0000.h5\n")
        kwargs["train_split"] = "train.txt"
    dm = KspaceDataModule("cine", root, synthetic=None, **kwargs)
    with pytest.raises(LayoutError, match=r"also in the (test|train) split") as err:
        dm.setup("fit")
    assert "cine_test_0000.h5" in str(err.value) or "renamed.h5" in str(err.value)


def test_content_hashes_are_cached_by_size_and_mtime(tiny_cine, tmp_path, monkeypatch):
    root = _copy(tiny_cine, tmp_path / "cine")
    hashed = []
    real = check._content_hash
    monkeypatch.setattr(check, "_content_hash", lambda p: hashed.append(Path(p).name) or real(p))
    check.clear_memory_cache()
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert len(hashed) == 4  # every file of every split, once
    check.clear_memory_cache()  # a new process: the JSON cache answers
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert len(hashed) == 4
    f = root / "val" / "cine_val_0000.h5"
    f.write_bytes(f.read_bytes())  # rewritten (new mtime): hashed again
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert hashed[4:] == ["cine_val_0000.h5"]


# ---------------------------------------------------------------------- twix: header, MDH and data disagree
def _brain_like(c: int, x: int, y: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-space (C, 2x, y) of a smooth object (a disc with a gentle phase) on a 2x oversampled
    readout, its image (2x, y) and coil maps (C, 1, 2x, y): real k-space, energy peak at DC."""
    from melrecon.data.npfft import fftc_np
    from melrecon.physics.coils import birdcage_maps

    xx, yy = np.meshgrid(np.linspace(-1, 1, x), np.linspace(-1, 1, y), indexing="ij")
    img = np.zeros((2 * x, y), np.complex64)
    img[x // 2: x // 2 + x] = (xx**2 + yy**2 < 0.7) * (1 + 0.3 * xx) * np.exp(0.5j * yy)
    maps = birdcage_maps((c, 1, 2 * x, y)).numpy()
    return fftc_np(maps[:, 0] * img[None], axes=(1, 2)), img, maps


def _write(tmp_path: Path, name: str, k: np.ndarray, center_lin: int, header_lines: int) -> Path:
    from twix_writer import Line, write_twix_file

    lines = [Line(k[:, :, ky], {"Lin": ky}, center_lin=center_lin) for ky in range(k.shape[-1])]
    return write_twix_file(tmp_path / name, lines, {"sKSpace.lPhaseEncodingLines": header_lines})


def test_twix_whose_header_and_mdh_centre_disagree_with_the_data_is_centred_on_the_data(tmp_path):
    """The real scan: MDH centre line 0, header 64 lines, data lines 0..127 peaking at 64. It
    used to be placed at 128..255 of a 256-line grid: a wrong image, exit status 0."""
    from melrecon.data.convert import convert_twix, read_twix
    from melrecon.data.h5 import read_scan

    c, x, y = 4, 8, 16
    k, img, maps = _brain_like(c, x, y)
    right, _, _ = read_twix(_write(tmp_path, "right.dat", k, y // 2, y))  # header and MDH agree
    path = _write(tmp_path, "meas_MID00007_brain.dat", k, 0, y // 2)
    with pytest.warns(UserWarning, match=r"meas_MID00007_brain\.dat: counter Lin: .*peaks at line 8") as rec:
        kspace, mode, _ = read_twix(path)
    assert not [w for w in rec if "using" in str(w.message)]  # no "using 32" placement around the MDH centre
    assert mode == "2d" and kspace.shape == right.shape == (c, 1, x, y)
    np.testing.assert_allclose(kspace, right, atol=1e-5 * np.abs(right).max())
    crop = slice(x // 2, x // 2 + x)
    with pytest.warns(UserWarning, match="peaks at line 8"):
        out = convert_twix(path, tmp_path / "brain.h5", maps=maps[:, :, crop], progress=False)
    target = read_scan(out)[0]["target"]
    assert np.linalg.norm(target[0] - img[crop]) / np.linalg.norm(img[crop]) < 1e-4


def test_twix_whose_lines_fit_the_header_around_a_wrong_mdh_centre_is_centred_on_the_data(tmp_path):
    """Header 32 lines, MDH centre 0: the 16 lines fit at 16..31 (silently wrong before); the
    energy peak puts them at 8..23 of the header's 32."""
    from melrecon.data.convert import read_twix

    c, x, y = 4, 8, 16
    k, _, _ = _brain_like(c, x, y)
    right, _, _ = read_twix(_write(tmp_path, "right.dat", k, y // 2, y))
    with pytest.warns(UserWarning, match="peaks at line 8"):
        kspace, _, _ = read_twix(_write(tmp_path, "wrong.dat", k, 0, 2 * y))
    assert kspace.shape == (c, 1, x, 2 * y)
    energy = (np.abs(kspace) ** 2).sum(axis=(0, 1, 2))
    assert int(np.argmax(energy)) == y  # the k-space peak at the grid centre
    np.testing.assert_allclose(kspace[..., y // 2: y // 2 + y], right, atol=1e-5 * np.abs(right).max())
    assert not np.abs(kspace[..., : y // 2]).any() and not np.abs(kspace[..., y // 2 + y:]).any()


def test_twix_with_disagreeing_centre_and_no_clear_peak_is_refused_naming_the_file(tmp_path, capsys):
    from melrecon.data.convert import read_twix
    from melrecon.data.convert.__main__ import main as convert_main

    rng = np.random.default_rng(0)
    noise = (rng.standard_normal((2, 16, 16)) + 1j * rng.standard_normal((2, 16, 16))).astype(np.complex64)
    path = _write(tmp_path, "noise.dat", noise, 0, 8)
    with pytest.raises(ValueError, match=r"noise\.dat: field 'mdh\.CenterLin': .*no clear k-space centre"):
        read_twix(path)
    assert convert_main(["twix", str(path), str(tmp_path / "out")]) != 0
    assert "noise.dat" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.h5")) if (tmp_path / "out").exists() else True
