"""Converters on small files written in each format's real on-disk layout.

Each test starts from a known image and known coil maps, writes the raw file exactly as the
scanner/challenge would (ISMRMRD acquisitions, fastMRI h5, MAT v7.3 compound h5), converts it
with the known maps, and requires the stored target to match the image (NRMSE < 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from melrecon.data.convert import convert_cmrxrecon, convert_fastmri, convert_mridata, convert_ocmr
from melrecon.data.h5 import read_scan, validate_file
from melrecon.data.npfft import fftc_np, ifftc_np
from melrecon.physics.coils import birdcage_maps


def nrmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _image(rng, shape):
    """Smooth-ish complex test image (random, no structure needed for exactness)."""
    img = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    return img.astype(np.complex64)


def _header_xml(enc, recon, ky_max, ky_center, slice_max=0, phase_max=0, avg_max=0):
    def m(v):
        return f"<matrixSize><x>{v[0]}</x><y>{v[1]}</y><z>{v[2]}</z></matrixSize>" \
               f"<fieldOfView_mm><x>{v[0]}</x><y>{v[1]}</y><z>{v[2]}</z></fieldOfView_mm>"

    def lim(name, mx, c=0):
        return f"<{name}><minimum>0</minimum><maximum>{mx}</maximum><center>{c}</center></{name}>"

    return (
        '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        "<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>"
        f"<encoding><encodedSpace>{m(enc)}</encodedSpace><reconSpace>{m(recon)}</reconSpace>"
        "<encodingLimits>" + lim("kspace_encoding_step_1", ky_max, ky_center) + lim("average", avg_max)
        + lim("slice", slice_max) + lim("phase", phase_max)
        + "</encodingLimits><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"
    )


def _acq(data, center=None, **idx):
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    for key, value in idx.items():
        setattr(acq.idx, key, int(value))
    if center is not None:
        acq.center_sample = int(center)
    return acq


def _write_ismrmrd(path, xml, acqs, noise=None):
    ds = ismrmrd.Dataset(str(path), "/dataset", create_if_needed=True)
    ds.write_xml_header(xml)
    if noise is not None:  # a noise pre-scan, as scanners store it: must be skipped
        acq = _acq(noise)
        acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        ds.append_acquisition(acq)
    for acq in acqs:
        ds.append_acquisition(acq)
    ds.close()


def _mridata_file(tmp_path, rng, c=4, x=6, y=8, z=6):
    img = _image(rng, (x, y, z))
    maps = birdcage_maps((c, x, y, z)).numpy()
    k_full = fftc_np(maps * img[None], axes=(1, 2, 3))  # (C, kx, ky, kz)
    # on disk: slice axis in image space with a (-1)^z chop, i.e. raw = chop * ifftc_z(k)
    raw = ifftc_np(k_full, axes=(3,)) * ((-1.0) ** np.arange(z))
    path = tmp_path / "knee.h5"
    acqs = [_acq(raw[:, :, ky, sl], kspace_encode_step_1=ky, slice=sl) for sl in range(z) for ky in range(y)]
    # header maximum = count (the off-by-one some tools write): the converter must trust the data
    _write_ismrmrd(path, _header_xml((x, y, z), (x, y, z), ky_max=y, ky_center=y // 2, slice_max=z - 1),
                   acqs, noise=rng.standard_normal((c, x)))
    return path, img, maps


def test_mridata_exact_with_known_maps(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path, img, maps = _mridata_file(tmp_path, rng)
    out = convert_mridata(path, tmp_path / "out" / "knee.h5", maps=maps, progress=False)
    arrays, info = read_scan(out)
    assert info.kind == "volume3d" and info.shape == maps.shape
    assert nrmse(arrays["target"], img) < 1e-5
    # hybrid space: the readout (X) is in image space, (Y, Z) in k-space
    assert nrmse(arrays["kspace"], fftc_np(maps * img[None], axes=(2, 3))) < 1e-5


def test_fastmri_exact_with_known_maps_and_readout_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    s, c, h, w = 3, 4, 16, 10
    img = np.zeros((s, h, w), np.complex64)
    img[:, h // 4: h // 4 + h // 2] = _image(rng, (s, h // 2, w))  # object inside the unoversampled FOV
    maps = birdcage_maps((c, s, h, w)).numpy()
    k = fftc_np(maps * img[None], axes=(2, 3)).transpose(1, 0, 2, 3)  # (slices, coils, H, W)
    path = tmp_path / "file1000.h5"
    with h5py.File(path, "w") as f:
        f["kspace"] = k.astype(np.complex64)
        f["reconstruction_rss"] = np.sqrt((np.abs(ifftc_np(k)) ** 2).sum(1)).astype(np.float32)
        f["ismrmrd_header"] = np.bytes_(_header_xml((h, w, 1), (h // 2, w, 1), w - 1, w // 2))
        f.attrs.update(acquisition="CORPDFS_FBK", max=1.0, norm=1.0, patient_id="x")
    out = convert_fastmri(path, tmp_path / "fm.h5", maps=maps, progress=False)
    arrays, _ = read_scan(out)
    assert arrays["kspace"].shape == (c, s, h, w)
    assert nrmse(arrays["target"], img) < 1e-5
    # readout crop 16 -> 8 keeps the object: compare with the cropped image and maps
    crop = slice(h // 4, h // 4 + h // 2)
    out = convert_fastmri(path, tmp_path / "fm_crop.h5", maps=maps[:, :, crop], readout_crop=h // 2, progress=False)
    arrays, _ = read_scan(out)
    assert arrays["target"].shape == (s, h // 2, w)
    assert nrmse(arrays["target"], img[:, crop]) < 1e-5


def _ocmr_file(tmp_path, rng, c=4, t=3, x=8, y=10, averages=2):
    """2x oversampled readout (16 samples for 8 pixels), two averages that differ by +-d."""
    img = np.zeros((t, 2 * x, y), np.complex64)
    img[:, x // 2: x // 2 + x] = _image(rng, (t, x, y))
    maps = birdcage_maps((c, 2 * x, y)).numpy()
    k = fftc_np(maps[:, None] * img[None], axes=(2, 3))  # (C, T, 2X, Y)
    d = 0.1 * _image(rng, k.shape)
    acqs = []
    for a in range(averages):
        ka = k + (d if a == 0 else -d) if averages == 2 else k
        for ph in range(t):
            for ky in range(y):
                acqs.append(_acq(ka[:, ph, :, ky], center=x, kspace_encode_step_1=ky, phase=ph, average=a))
    path = tmp_path / "fs_0001_1_5T.h5"
    _write_ismrmrd(path, _header_xml((2 * x, y, 1), (x, y, 1), y - 1, y // 2, phase_max=t - 1, avg_max=averages - 1), acqs)
    crop = slice(x // 2, x // 2 + x)
    return path, img[:, crop], maps[:, crop]


def test_ocmr_exact_with_known_maps(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path, img, maps = _ocmr_file(tmp_path, rng)
    out = convert_ocmr(path, tmp_path / "ocmr.h5", maps=maps[None], progress=False)
    arrays, info = read_scan(out)
    assert info.kind == "cine" and arrays["kspace"].shape == (1, 4, 3, 8, 10)
    assert nrmse(arrays["target"][0], img) < 1e-5


@pytest.mark.parametrize("odd", [False, True])
def test_cmrxrecon_exact_with_known_maps(tmp_path: Path, odd: bool) -> None:
    rng = np.random.default_rng(3)
    s, c, t, x, y = 2, 4, 3, 12 + odd, 10 + odd  # odd sizes: the FFT shift order matters
    img = _image(rng, (s, t, x, y))
    maps = birdcage_maps((c, x, y)).numpy()
    coil = maps[None, :, None] * img[:, None]  # (S, C, T, X, Y)
    ax = (-2, -1)
    # the challenge's fft2c (inverse of its ifft2c = ifftshift(ifft2(fftshift(.))))
    k = np.fft.ifftshift(np.fft.fftn(np.fft.fftshift(coil, axes=ax), axes=ax, norm="ortho"), axes=ax)
    k_h5 = k.transpose(2, 0, 1, 4, 3)  # h5py view of MATLAB (kx, ky, sc, sz, t): (t, sz, sc, ky, kx)
    comp = np.empty(k_h5.shape, dtype=[("real", "<f4"), ("imag", "<f4")])
    comp["real"], comp["imag"] = k_h5.real, k_h5.imag
    path = tmp_path / "P001" / "cine_sax.mat"
    path.parent.mkdir()
    with h5py.File(path, "w", userblock_size=512) as f:  # MAT v7.3 files carry a 512-byte header
        f["kspace_full"] = comp
    out = convert_cmrxrecon(path, tmp_path / "cmr.h5", maps=np.stack([maps] * s), progress=False)
    arrays, _ = read_scan(out)
    assert arrays["kspace"].shape == (s, c, t, x, y)
    assert nrmse(arrays["target"], img) < 1e-5


def test_espirit_path_runs_and_cli(tmp_path: Path) -> None:
    """Without known maps the converters estimate ESPIRiT maps; the result validates and the
    coil combination recovers the image up to a per-pixel phase where the maps are supported."""
    c, t, x, y = 4, 3, 24, 24
    yy, xx = np.mgrid[:x, :y] - 12
    obj = ((xx / 9.0) ** 2 + (yy / 7.0) ** 2 < 1).astype(np.complex64) * (1 + 0.2 * np.cos(xx / 3))
    img = np.stack([obj] * t).astype(np.complex64)
    maps = birdcage_maps((c, x, y)).numpy()
    k = fftc_np(maps[None, :, None] * img[None, None], axes=(-2, -1))
    k_h5 = k.transpose(2, 0, 1, 4, 3)
    comp = np.empty(k_h5.shape, dtype=[("real", "<f4"), ("imag", "<f4")])
    comp["real"], comp["imag"] = k_h5.real, k_h5.imag  # even sizes: both shift orders agree
    src = tmp_path / "P002" / "cine_sax.mat"
    src.parent.mkdir()
    with h5py.File(src, "w") as f:
        f["kspace_full"] = comp
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    run = subprocess.run([sys.executable, "-m", "melrecon.data.convert", "cmrxrecon", str(tmp_path / "P002"),
                          str(tmp_path / "out"), "--calib", "12"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out" / "P002_cine_sax.h5"
    info = validate_file(out)
    assert info.kind == "cine"
    arrays, _ = read_scan(out)
    inside = np.abs(obj) > 0.5
    err = np.abs(np.abs(arrays["target"][0]) - np.abs(img))[:, inside]
    assert err.max() / np.abs(img).max() < 0.05
    # a second run skips the existing file; a broken input fails with the file named
    bad = tmp_path / "bad"
    bad.mkdir()
    with h5py.File(bad / "cine_lax.mat", "w") as f:
        f["something_else"] = np.zeros(3)
    run = subprocess.run([sys.executable, "-m", "melrecon.data.convert", "cmrxrecon", str(bad), str(tmp_path / "out2")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "cine_lax.mat" in run.stderr and "kspace_full" in run.stderr


def test_espirit_volume_path(tmp_path: Path) -> None:
    """The 3D path estimates maps per readout position (here: fastMRI slices) and validates."""
    c, s, h, w = 4, 2, 24, 20
    yy, xx = np.mgrid[:h, :w]
    obj = (((yy - 12) / 9.0) ** 2 + ((xx - 10) / 7.0) ** 2 < 1).astype(np.complex64)
    maps = birdcage_maps((c, s, h, w)).numpy()
    k = fftc_np(maps * obj[None, None], axes=(2, 3)).transpose(1, 0, 2, 3)
    path = tmp_path / "file1001.h5"
    with h5py.File(path, "w") as f:
        f["kspace"] = k.astype(np.complex64)
    out = convert_fastmri(path, tmp_path / "fm.h5", calib=12, progress=False)
    arrays, info = read_scan(out)
    assert info.shape == (c, s, h, w)
    inside = np.abs(obj) > 0.5
    assert np.abs(np.abs(arrays["target"][:, inside]) - 1).max() < 0.05


@pytest.mark.parametrize("shape", [(4, 6), (5, 7), (3, 4, 5)])
def test_numpy_fft_matches_physics_fft(shape) -> None:
    """Converters/generator (numpy) and the network's operator (torch) share one FFT convention."""
    import torch

    from melrecon.physics.fft import fftc, ifftc

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    dims = tuple(range(-len(shape) + 1, 0))
    assert np.abs(fftc_np(x, axes=dims) - fftc(torch.from_numpy(x), dims).numpy()).max() < 1e-5
    assert np.abs(ifftc_np(x, axes=dims) - ifftc(torch.from_numpy(x), dims).numpy()).max() < 1e-5
    assert fftc_np(x, axes=dims).dtype == np.complex64
