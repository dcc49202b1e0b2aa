"""Layout writer/reader round trip and the validate CLI on every kind of broken file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from melrecon.data.h5 import LayoutError, read_scan, validate_file, write_scan
from melrecon.data.npfft import ifftc_np, sense_combine_np
from melrecon.data.validate import main as validate_main


def _unit_maps(m: np.ndarray, coil_axis: int) -> np.ndarray:
    """Normalise maps to unit sum of squares over coils (what validate requires)."""
    return (m / np.sqrt((np.abs(m) ** 2).sum(coil_axis, keepdims=True))).astype(np.complex64)


def _volume(rng, c=3, x=5, y=6, z=4):
    """Random k-space and maps with the consistent target S^H F^H k (validate checks it)."""
    k = (rng.standard_normal((c, x, y, z)) + 1j * rng.standard_normal((c, x, y, z))).astype(np.complex64)
    m = _unit_maps(rng.standard_normal((c, x, y, z)) + 1j * rng.standard_normal((c, x, y, z)), 0)
    t = sense_combine_np(ifftc_np(k), m).astype(np.complex64)
    return k, m, t


@pytest.fixture
def good(tmp_path: Path) -> Path:
    k, m, t = _volume(np.random.default_rng(0))
    return write_scan(tmp_path / "good.h5", k, m, t, kind="volume3d", source="test")


def test_round_trip_exact_volume_and_cine(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    k, m, t = _volume(rng)
    write_scan(tmp_path / "v.h5", k, m, t, kind="volume3d", source="unit test", extra_attrs={"snr": 3.5})
    arrays, info = read_scan(tmp_path / "v.h5")
    assert np.array_equal(arrays["kspace"], k) and np.array_equal(arrays["maps"], m)
    assert np.array_equal(arrays["target"], t)
    assert info.kind == "volume3d" and info.axes == "coil,x,y,z" and info.shape == k.shape
    assert info.max == pytest.approx(float(np.abs(t).max()))
    assert info.source == "unit test"
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert f.attrs["snr"] == 3.5 and f.attrs["layout_version"] == 1

    kc = rng.standard_normal((2, 3, 4, 6, 5)).astype(np.complex64)  # (S, C, T, X, Y)
    mc = _unit_maps(rng.standard_normal((2, 3, 6, 5)) + 1j, 1)
    tc = sense_combine_np(ifftc_np(kc), mc[:, :, None], coil_axis=1).astype(np.complex64)
    write_scan(tmp_path / "c.h5", kc, mc, tc, kind="cine", source="s")
    arrays, info = read_scan(tmp_path / "c.h5")
    assert info.axes == "slice,coil,time,x,y" and info.positions == 2 and info.num_coils == 3
    assert np.array_equal(arrays["kspace"], kc) and np.array_equal(arrays["target"], tc)
    # single-slice cine without the slice axis
    write_scan(tmp_path / "c1.h5", kc[0], mc[0], tc[0], kind="cine", source="s")
    assert validate_file(tmp_path / "c1.h5").positions == 1
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    k, m, t = _volume(np.random.default_rng(2))
    with pytest.raises(ValueError, match="maps shape"):
        write_scan(tmp_path / "a.h5", k, m[:, :-1], t, kind="volume3d", source="s")
    with pytest.raises(ValueError, match="kind"):
        write_scan(tmp_path / "a.h5", k, m, t, kind="volume2d", source="s")
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_scan(tmp_path / "a.h5", k, m, t, kind="volume3d", source="s")
    assert not (tmp_path / "a.h5").exists()


def _break(path: Path, case: str) -> None:
    if case == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
        return
    with h5py.File(path, "r+") as f:
        if case == "missing":
            del f["maps"]
        elif case == "dtype":
            data = f["target"][()]
            del f["target"]
            f["target"] = np.abs(data).astype(np.float32)
        elif case == "shape":
            data = f["maps"][()]
            del f["maps"]
            f["maps"] = data[:, :, :-1]
        elif case in ("nan", "inf"):
            f["kspace"][0, 2, 1, 1] = np.nan if case == "nan" else np.inf
        elif case == "kind":
            f.attrs["kind"] = "volume4d"


CASES = {  # case -> field the error must name
    "missing": "maps",
    "dtype": "target",
    "shape": "maps",
    "nan": "kspace",
    "inf": "kspace",
    "truncated": None,  # the first unreadable field, or 'file' if the header is gone
    "kind": "kind",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_names_file_and_field(good: Path, case: str, capsys) -> None:
    bad = good.with_name(f"bad_{case}.h5")
    os.replace(good, bad)
    _break(bad, case)
    with pytest.raises(LayoutError) as err:
        validate_file(bad)
    assert str(bad) in str(err.value)
    if CASES[case] is not None:
        assert err.value.field == CASES[case]
        assert f"field '{CASES[case]}'" in str(err.value)
    else:
        assert err.value.field in ("file", "kspace", "maps", "target")
    # the CLI (in-process) exits non-zero and prints the same message
    assert validate_main([str(bad)]) == 1
    assert f"{bad}: field '{err.value.field}'" in capsys.readouterr().err


def test_validate_cli_folder(tmp_path: Path, good: Path) -> None:
    k, m, t = _volume(np.random.default_rng(3))
    write_scan(tmp_path / "sub" / "also_good.h5", k, m, t, kind="volume3d", source="s")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    ok = subprocess.run([sys.executable, "-m", "melrecon.data.validate", str(tmp_path)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "2 ok, 0 bad" in ok.stdout
    _break(good, "nan")
    bad = subprocess.run([sys.executable, "-m", "melrecon.data.validate", str(tmp_path)], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert f"{good}: field 'kspace': contains NaN or Inf" in bad.stderr
    assert validate_main([str(tmp_path / "nothing_here")]) == 1


def test_stored_mask_round_trip_zero_filled_max_and_errors(tmp_path: Path) -> None:
    """The optional ``mask``: stored as given, k-space kept only where sampled, target optional
    (``max`` then from the zero-filled image), broken masks named by field."""
    from melrecon.data.datasets import SlabDataset
    from melrecon.data.h5 import zero_filled_max
    from melrecon.data.npfft import ifftc_np

    rng = np.random.default_rng(3)
    k, m, t = _volume(rng)
    mask = np.zeros((6, 4), np.float32)
    mask[::2] = 1
    write_scan(tmp_path / "p.h5", k, m, None, kind="volume3d", source="t", mask=mask)
    arrays, info = read_scan(tmp_path / "p.h5")
    assert info.has_mask and not info.has_target and "target" not in arrays
    assert np.array_equal(arrays["mask"], mask) and np.array_equal(arrays["kspace"], k * mask)
    zf = np.sum(np.conj(m) * ifftc_np(k * mask, axes=(-2, -1)), axis=0)
    assert info.max == pytest.approx(float(np.abs(zf).max()), rel=1e-6)
    assert zero_filled_max(k * mask, m, "coil,x,y,z") == pytest.approx(info.max, rel=1e-12)
    with pytest.raises(ValueError, match="cannot be used for training"):
        SlabDataset([tmp_path / "p.h5"], slab_size=1, train=True, calib=2)
    with pytest.raises(ValueError, match="must carry its sampling mask"):
        write_scan(tmp_path / "q.h5", k, m, None, kind="volume3d", source="t")
    with pytest.raises(ValueError, match="mask: shape"):
        write_scan(tmp_path / "q.h5", k, m, t, kind="volume3d", source="t", mask=mask[:, :3])
    # files broken after writing
    for name, bad in (("shape", np.ones((6, 3), np.float32)), ("values", mask * 0.5),
                      ("empty", np.zeros((6, 4), np.float32))):
        path = tmp_path / f"bad_{name}.h5"
        write_scan(path, k, m, t, kind="volume3d", source="t", mask=mask)
        with h5py.File(path, "a") as f:
            del f["mask"]
            f.create_dataset("mask", data=bad)
        with pytest.raises(LayoutError, match="field 'mask'"):
            validate_file(path)
    path = tmp_path / "no_target.h5"
    write_scan(path, k, m, t, kind="volume3d", source="t")
    with h5py.File(path, "a") as f:
        del f["target"]
    with pytest.raises(LayoutError, match="field 'target': missing dataset"):
        validate_file(path)
    # cine: one mask row per frame, each must hold a sample
    kc = (rng.standard_normal((2, 3, 4, 5, 6)) + 0j).astype(np.complex64)
    mc = np.ones((2, 4, 6), np.float32)
    mc[1, 2] = 0
    with pytest.raises(ValueError, match="a frame"):
        write_scan(tmp_path / "c.h5", kc, np.ones((2, 3, 5, 6), np.complex64), None, kind="cine", source="t", mask=mc)
