"""The twix converter on small Siemens files written by the tests (tests/twix_writer.py).

Each file is written line by line from a known image and known coil maps, with the loop
counters, oversampled readout, averages and extra non-imaging lines (noise, phase correction)
a scanner stores. The converted file must pass ``melrecon.data.validate`` and its target must
match a NumPy reference: the known image where the acquisition is complete, an independent
zero-filled reconstruction where it is not (asymmetric echo, partial Fourier).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from twix_writer import Line, write_twix_file

from melrecon.data.convert import convert_twix, read_twix
from melrecon.data.convert.__main__ import main as convert_main
from melrecon.data.h5 import read_scan
from melrecon.data.npfft import fftc_np, ifftc_np
from melrecon.data.validate import main as validate_main
from melrecon.physics.coils import birdcage_maps

FOV = {"sSliceArray.asSlice[0].dReadoutFOV": 256.0, "sSliceArray.asSlice[0].dPhaseFOV": 192.0,
       "sSliceArray.asSlice[0].dThickness": 48.0}


def nrmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _object(rng, lead, x, y):
    """Complex image on a 2x oversampled readout (2x, y) that is zero outside the central x."""
    img = np.zeros((*lead, 2 * x, y), np.complex64)
    img[..., x // 2: x // 2 + x, :] = rng.standard_normal((*lead, x, y)) + 1j * rng.standard_normal((*lead, x, y))
    return img


def _extra_lines(rng, c, n):
    """A noise-adjust scan and a phase-correction line: both must be ignored."""
    junk = (100 * rng.standard_normal((c, n))).astype(np.complex64)
    return [Line(junk, flags=("NOISEADJSCAN",)), Line(junk, {"Lin": 0}, flags=("PHASCOR",))]


def test_twix_3d_exact_with_averages(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    c, x, y, z = 3, 8, 6, 4
    img = _object(rng, (), x, y)[..., None] * rng.standard_normal(z)  # (2x, y, z)
    maps = birdcage_maps((c, 2 * x, y, z)).numpy()
    k = fftc_np(maps * img[None], axes=(1, 2, 3))  # (C, 2x, ky, kz)
    d = 0.2 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    lines = _extra_lines(rng, c, 2 * x)
    for ave, sign in enumerate((1, -1)):  # two averages differing by +-d: their mean is k
        for kz in range(z):
            for ky in range(y):
                lines.append(Line((k + sign * d)[:, :, ky, kz], {"Lin": ky, "Par": kz, "Ave": ave},
                                  center_lin=y // 2, center_par=z // 2))
    yaps = {"sKSpace.lPhaseEncodingLines": y, "sKSpace.lPartitions": z, "sKSpace.lImagesPerSlab": z, **FOV}
    path = write_twix_file(tmp_path / "meas_MID00042_gre3d.dat", lines, yaps)

    crop = slice(x // 2, x // 2 + x)
    out = convert_twix(path, tmp_path / "gre3d.h5", maps=maps[:, crop], progress=False)
    assert validate_main([str(out)]) == 0
    arrays, info = read_scan(out)
    assert info.kind == "volume3d" and info.shape == (c, x, y, z)
    assert nrmse(arrays["target"], img[crop]) < 1e-5
    # hybrid space: readout in image space, (ky, kz) in k-space
    assert nrmse(arrays["kspace"], fftc_np(maps[:, crop] * img[None, crop], axes=(2, 3))) < 1e-5
    import h5py

    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f.attrs["voxel_size_mm"], [256.0 / x, 192.0 / y, 48.0 / z])
        assert f.attrs["twix_mode"] == "3d"


def test_twix_2d_multislice_exact_interleaved(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    s, c, x, y = 3, 4, 8, 6
    img = _object(rng, (s,), x, y)  # (S, 2x, y)
    maps = birdcage_maps((c, s, 2 * x, y)).numpy()
    k = fftc_np(maps * img[None], axes=(2, 3))  # (C, S, kx, ky)
    lines = _extra_lines(rng, c, 2 * x)
    for sl in (1, 0, 2):  # interleaved slice order: the Sli counter, not the order, places a slice
        lines += [Line(k[:, sl, :, ky], {"Lin": ky, "Sli": sl}, center_lin=y // 2) for ky in range(y)]
    yaps = {"sKSpace.lPhaseEncodingLines": y, "sGroupArray.asGroup[0].dDistFact": 0.5, **FOV}
    path = write_twix_file(tmp_path / "tse2d.dat", lines, yaps)

    crop = slice(x // 2, x // 2 + x)
    kspace, mode, attrs = read_twix(path)
    assert mode == "2d" and kspace.shape == (c, s, x, y)
    out = convert_twix(path, tmp_path / "tse2d.h5", maps=maps[:, :, crop], progress=False)
    assert validate_main([str(out)]) == 0
    arrays, info = read_scan(out)
    assert info.kind == "volume3d" and info.shape == (c, s, x, y)
    assert nrmse(arrays["target"], img[:, crop]) < 1e-5
    np.testing.assert_allclose(attrs["voxel_size_mm"], [48.0 * 1.5, 256.0 / x, 192.0 / y])
    # a tighter readout crop keeps the pixel spacing (a smaller field of view)
    cropped, _, attrs = read_twix(path, readout_crop=x // 2)
    assert cropped.shape == (c, s, x // 2, y)
    np.testing.assert_allclose(attrs["voxel_size_mm"], [48.0 * 1.5, 256.0 / x, 192.0 / y])


def test_twix_segmented_cine_exact(tmp_path: Path) -> None:
    """Segmented cine: each heartbeat acquires one segment of lines for every cardiac phase."""
    rng = np.random.default_rng(2)
    s, c, t, x, y, seg = 2, 3, 4, 8, 6, 2
    img = _object(rng, (s, t), x, y)  # (S, T, 2x, y)
    maps = birdcage_maps((c, 2 * x, y)).numpy()
    k = fftc_np(maps[None, :, None] * img[:, None], axes=(-2, -1))  # (S, C, T, kx, ky)
    lines = _extra_lines(rng, c, 2 * x)
    per = y // seg
    for sl in range(s):
        for beat in range(seg):
            for ph in range(t):
                for ky in range(beat * per, (beat + 1) * per):
                    lines.append(Line(k[sl, :, ph, :, ky], {"Lin": ky, "Phs": ph, "Sli": sl, "Seg": beat},
                                      center_lin=y // 2))
    path = write_twix_file(tmp_path / "cine.dat", lines, {"sKSpace.lPhaseEncodingLines": y, **FOV})

    crop = slice(x // 2, x // 2 + x)
    known = np.stack([maps[:, crop]] * s)
    out = convert_twix(path, tmp_path / "cine.h5", maps=known, progress=False)
    assert validate_main([str(out)]) == 0
    arrays, info = read_scan(out)
    assert info.kind == "cine" and arrays["kspace"].shape == (s, c, t, x, y)
    assert nrmse(arrays["target"], img[..., crop, :]) < 1e-5


def test_twix_asymmetric_echo_partial_fourier_reflect(tmp_path: Path) -> None:
    """Missing early readout samples and ky lines are zero-filled at the right place; lines
    flagged REFLECT are reversed. Reference: NumPy zero-filled reconstruction of the same
    k-space with the same samples zeroed."""
    rng = np.random.default_rng(3)
    c, x, y, skip_x, skip_y = 3, 8, 8, 3, 2
    img = _object(rng, (1,), x, y)
    maps = birdcage_maps((c, 1, 2 * x, y)).numpy()
    k = fftc_np(maps * img[None], axes=(2, 3))[:, 0]  # (C, 2x, ky)
    lines = []
    for ky in range(skip_y, y):  # partial Fourier: the first skip_y lines are never acquired
        line = k[:, skip_x:, ky]  # asymmetric echo: the first skip_x samples are not sampled
        reflect = ky % 2 == 1
        lines.append(Line(line[:, ::-1] if reflect else line, {"Lin": ky}, center_col=x - skip_x,
                          center_lin=y // 2, flags=("REFLECT",) if reflect else ()))
    path = write_twix_file(tmp_path / "pf.dat", lines, {"sKSpace.lPhaseEncodingLines": y})
    kspace, mode, attrs = read_twix(path)
    assert mode == "2d" and "voxel_size_mm" not in attrs  # no field of view in this header
    zf = k.copy()
    zf[:, :skip_x] = 0
    zf[:, :, :skip_y] = 0
    coil = ifftc_np(zf, axes=(1, 2))[:, x // 2: x // 2 + x]
    ref_kspace = fftc_np(coil, axes=(1, 2))
    assert kspace.shape == (c, 1, x, y)
    assert nrmse(kspace[:, 0], ref_kspace) < 1e-5


def test_twix_undersampled_warns_and_bad_files_fail(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    c, x, y = 2, 8, 8
    lines = [Line((rng.standard_normal((c, 2 * x)) + 0j).astype(np.complex64), {"Lin": ky}, center_lin=y // 2)
             for ky in range(0, y, 2)]  # every other line: iPAT R=2
    lines.append(Line(lines[0].data, {"Lin": y - 1}, center_lin=y // 2))
    path = write_twix_file(tmp_path / "ipat.dat", lines, {"sKSpace.lPhaseEncodingLines": y})
    with pytest.warns(UserWarning, match="missing"):
        read_twix(path)
    # two varying counters that the layout cannot hold
    lines = [Line(np.ones((c, 2 * x), np.complex64), {"Lin": ky, "Par": p, "Phs": p}, center_lin=1)
             for ky in range(2) for p in range(2)]
    path = write_twix_file(tmp_path / "cine3d.dat", lines, {})
    with pytest.raises(ValueError, match="cine3d.dat.*Par and Phs"):
        read_twix(path)
    with pytest.raises(ValueError, match="Phs"):
        read_twix(path, mode="3d")
    raw = path.read_bytes()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(raw[:len(raw) - 1500])  # the last lines and the ACQEND block are missing
    with pytest.raises(ValueError, match="cut.dat.*truncated"):
        read_twix(cut)
    bad = tmp_path / "notwix.dat"
    bad.write_bytes(b"definitely not a twix file" * 10)
    with pytest.raises(ValueError, match="notwix.dat"):
        read_twix(bad)
    with pytest.raises(ValueError, match="mode"):
        read_twix(path, mode="4d")


def test_twix_cli_folder(tmp_path: Path, capsys) -> None:
    """``python -m melrecon.data.convert twix IN OUT``: .dat files of a folder, ESPIRiT maps."""
    c, x, y = 4, 24, 24
    yy, xx = np.mgrid[:2 * x, :y]
    obj = (((yy - x) / 9.0) ** 2 + ((xx - 12) / 8.0) ** 2 < 1).astype(np.complex64)
    maps = birdcage_maps((c, 2 * x, y)).numpy()
    k = fftc_np(maps * obj[None], axes=(1, 2))
    src = tmp_path / "raw"
    src.mkdir()
    write_twix_file(src / "gre.dat", [Line(k[:, :, ky], {"Lin": ky}, center_lin=y // 2) for ky in range(y)],
                    {"sKSpace.lPhaseEncodingLines": y, **FOV})
    (src / "notes.txt").write_text("not raw data: skipped")
    assert convert_main(["twix", str(src), str(tmp_path / "out"), "--calib", "12"]) == 0
    out = tmp_path / "out" / "gre.h5"
    assert validate_main([str(out)]) == 0
    arrays, info = read_scan(out)
    assert info.shape == (c, 1, x, y)
    inside = np.abs(obj[x // 2: x // 2 + x]) > 0.5
    assert np.abs(np.abs(arrays["target"][0][inside]) - 1).max() < 0.05
    # a readout crop larger than the readout is an error naming the file
    assert convert_main(["twix", str(src / "gre.dat"), str(tmp_path / "big.h5"), "--readout-crop", "99"]) == 1
    assert "gre.dat" in capsys.readouterr().err
