"""Parametric phantoms for the synthetic datasets (numpy, seeded, no downloads).

- :func:`knee_volume`: a knee-like 3D volume (X, Y, Z): skin/fat, muscle, femur and tibia with
  cortical bone and textured marrow, cartilage caps, joint fluid and random small structures,
  smooth random phase.
- :func:`cine_series`: a beating-heart 2D+t phantom (T, X, Y): body with subcutaneous fat
  (chest wall), lungs, liver, LV blood pool and myocardium whose radii follow a periodic cardiac
  waveform (myocardial area conserved, so the wall thickens in systole), RV crescent, optional
  respiratory shift of the heart/lungs/liver, texture and smooth random phase.

Edges are anti-aliased (soft over one pixel) so the images are band-limited enough to look like
MR images rather than binary masks. Magnitudes are O(1) (blood = 1).

``version=2`` (opt-in; version 1 is unchanged bit for bit) adds the fine structure that the
studies need, drawn after all version-1 parameters from the same generator:

- knee: tissue texture elongated along the readout axis X (fibres, trabeculae: correlation
  2.5 pixels along X, 0.7 across) and thin tubes (vessels bright, ligament fibres dark, radius
  0.5-1 pixel) that run through many readout planes along smooth oblique paths. In one (Y, Z)
  plane such a tube is a dot of a pixel or two, easily mistaken for noise or aliasing; across
  planes it is a continuous line, which a 3D network can use and a 2D one cannot.
- cine: fine static texture of the chest-wall tissue (correlation 0.7 pixels, recoverable from
  the ky-t sampling of many frames), small static vessels, and 2-3 papillary muscles (dark
  disks in the LV blood pool) that move radially with the endocardium and thicken in systole.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from melrecon.data.simulate import normalized_grid as _grid
from melrecon.data.simulate import polynomial_phase as _smooth_phase
from melrecon.data.simulate import smooth_field as _smooth_field


def _soft_ellipsoid(
    grid: list[np.ndarray],
    center: np.ndarray,
    semi: np.ndarray,
    angle: float = 0.0,
    pixel: float = 0.05,
) -> np.ndarray:
    """Soft indicator (0..1) of an ellipse/ellipsoid; ``angle`` rotates the first two axes.

    The boundary ramps over about one pixel (``pixel`` in normalised units) using the signed
    distance approximated by ``(1 - rho) * min(semi)``.
    """
    d = [g - c for g, c in zip(grid, center)]
    if angle:
        ca, sa = np.cos(angle), np.sin(angle)
        d[0], d[1] = ca * d[0] + sa * d[1], -sa * d[0] + ca * d[1]
    rho2 = sum((di / s) ** 2 for di, s in zip(d, semi))
    rho = np.sqrt(rho2)
    sd = (1.0 - rho) * float(np.min(semi))
    return np.clip(0.5 + sd / pixel, 0.0, 1.0)


def _soft_tube_plane(yy: np.ndarray, zz: np.ndarray, yc: float, zc: float, radius: float) -> np.ndarray:
    """Soft (anti-aliased over one pixel) disk of ``radius`` pixels at (yc, zc) in one plane."""
    d = np.sqrt((yy - yc) ** 2 + (zz - zc) ** 2)
    return np.clip(0.5 + radius - d, 0.0, 1.0)


def _knee_fine_structures(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Version-2 knee detail (module doc): readout-elongated texture and through-plane tubes."""
    nx, ny, nz = img.shape
    tissue = np.clip((img - 0.1) / 0.1, 0.0, 1.0)  # soft mask of the object (not the air)
    f = gaussian_filter(rng.standard_normal(img.shape), sigma=(2.5, 0.7, 0.7), mode="wrap")
    f = (f - f.mean()) / (f.std() + 1e-12)
    out = img * (1 + 0.25 * tissue * np.tanh(1.5 * f))
    yy, zz = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
    for _ in range(int(rng.integers(8, 17))):
        y0, z0 = rng.uniform(0.25, 0.75) * ny, rng.uniform(0.25, 0.75) * nz
        slope = rng.uniform(-0.4, 0.4, 2)  # pixels per readout plane
        amp, freq, ph = rng.uniform(0, 1.5, 2), rng.uniform(0.5, 2.0) * 2 * np.pi / nx, rng.uniform(0, 2 * np.pi, 2)
        radius = rng.uniform(0.5, 1.0)
        value = rng.uniform(0.9, 1.25) if rng.uniform() < 0.6 else rng.uniform(0.02, 0.1)  # vessel or fibre
        x0, x1 = sorted(rng.integers(0, nx + 1, 2))
        x0, x1 = (0, nx) if x1 - x0 < nx // 2 else (int(x0), int(x1))  # runs through >= half the planes
        for x in range(x0, x1):
            t = x - nx / 2
            yc = y0 + slope[0] * t + amp[0] * np.sin(freq * t + ph[0])
            zc = z0 + slope[1] * t + amp[1] * np.sin(freq * t + ph[1])
            w = _soft_tube_plane(yy, zz, yc, zc, radius) * tissue[x]
            out[x] = out[x] * (1 - w) + w * value
    return np.clip(out, 0, None)


def knee_volume(shape: tuple[int, int, int], rng: np.random.Generator, version: int = 1) -> np.ndarray:
    """A knee-like complex volume of shape (X, Y, Z); the leg runs along Y.

    Args:
        shape: (X, Y, Z) matrix.
        rng: numpy random generator (all anatomy parameters are drawn from it).
        version: 1 (the original phantom) or 2 (with the fine structure of the module doc).

    Returns:
        complex128 image, magnitude in [0, ~1.2].
    """
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"knee volume shape must be 3 sizes >= 4, got {shape}")
    _check_version(version)
    g = _grid(shape)
    px = 2.0 / min(shape)
    u = lambda lo, hi, n=None: rng.uniform(lo, hi, n)  # noqa: E731
    img = np.zeros(shape)
    tilt = u(-0.2, 0.2)
    # skin + subcutaneous fat, then muscle inside
    outer = _soft_ellipsoid(g, np.array([u(-0.05, 0.05), 0.0, u(-0.05, 0.05)]), np.array([u(0.78, 0.9), 1.3, u(0.75, 0.9)]), tilt, px)
    inner = _soft_ellipsoid(g, np.array([0.0, 0.0, 0.0]), np.array([0.68, 1.3, 0.66]) * u(0.92, 1.0), tilt, px)
    img += 0.85 * outer * (1 - inner) + 0.35 * inner * (1 + 0.12 * _smooth_field(rng, shape, 2.0))
    # femur (Y < 0) and tibia (Y > 0): cortical shell (dark), textured marrow (bright fat)
    gap = u(0.05, 0.1)
    marrow_tex = 1 + 0.2 * _smooth_field(rng, shape, 1.2)
    for sign, length in ((-1, u(0.7, 0.9)), (1, u(0.6, 0.8))):
        c = np.array([u(-0.08, 0.08), sign * (gap + length), u(-0.08, 0.08)])
        semi = np.array([u(0.3, 0.42), length, u(0.3, 0.42)])
        bone = _soft_ellipsoid(g, c, semi, tilt, px)
        marrow = _soft_ellipsoid(g, c, semi - 0.05, tilt, px)
        cart = _soft_ellipsoid(g, c, semi + np.array([0.03, 0.04, 0.03]), tilt, px)
        img = img * (1 - cart) + 0.95 * (cart - bone)  # cartilage cap around the bone end
        img = img + bone * (0.05 - img) * (1 - marrow) + marrow * (0.75 * marrow_tex - img)
    # joint fluid and a few random small structures (vessels, ligaments, fat pads)
    for _ in range(int(rng.integers(2, 5))):
        blob = _soft_ellipsoid(g, u(-0.5, 0.5, 3) * np.array([1, 0.3, 1]), u(0.04, 0.15, 3), u(0, np.pi), px)
        img = img * (1 - blob) + blob * u(0.1, 1.1)
    img = np.clip(img, 0, None)
    if version == 2:
        img = _knee_fine_structures(img, rng)
    return img * np.exp(1j * _smooth_phase(rng, g, u(0.5, 1.5)))


def _check_version(version: int) -> int:
    if version not in (1, 2):
        raise ValueError(f"phantom version must be 1 or 2, got {version!r}")
    return version


def cardiac_waveform(t: np.ndarray, systole: float = 0.35) -> np.ndarray:
    """Contraction w(t) in [0, 1] over one cycle (t in [0, 1)): fast systole, slow diastole."""
    t = np.mod(t, 1.0)
    up = np.sin(0.5 * np.pi * np.clip(t / systole, 0, 1)) ** 2
    down = 0.5 * (1 + np.cos(np.pi * np.clip((t - systole) / (1 - systole), 0, 1)))
    return np.where(t < systole, up, down)


def cine_series(
    frames: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    respiration: float = 0.03,
    version: int = 1,
) -> np.ndarray:
    """A beating-heart short-axis cine of shape (T, X, Y).

    Args:
        frames: number of frames T covering one cardiac cycle (start phase random).
        shape: (X, Y) matrix.
        rng: random generator for anatomy, heart rate phase, ejection fraction.
        respiration: peak respiratory shift of heart, lungs and liver (normalised units; 0 off).
        version: 1 (the original phantom) or 2 (with the fine structure of the module doc).

    Returns:
        complex128 series, blood magnitude about 1.
    """
    if frames < 1 or len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"cine phantom needs frames >= 1 and (X, Y) >= 8, got {frames}, {shape}")
    _check_version(version)
    g = _grid(tuple(shape))
    px = 2.0 / min(shape)
    u = lambda lo, hi, n=None: rng.uniform(lo, hi, n)  # noqa: E731
    t = (np.arange(frames) / frames + u(0, 1)) % 1.0
    w = cardiac_waveform(t, systole=u(0.3, 0.4))
    resp = respiration * np.sin(2 * np.pi * (np.arange(frames) / frames * u(0.2, 0.5) + u(0, 1)))
    body_semi = np.array([u(0.7, 0.85), u(0.8, 0.95)])
    body = _soft_ellipsoid(g, np.zeros(2), body_semi, 0.0, px)
    body_in = _soft_ellipsoid(g, np.zeros(2), body_semi - u(0.06, 0.1), 0.0, px)
    static = 0.9 * (body - body_in) + 0.3 * body_in * (1 + 0.1 * _smooth_field(rng, tuple(shape), 2.0))
    heart_c = np.array([u(-0.15, 0.05), u(-0.15, 0.15)])
    r_ed = u(0.16, 0.22)  # end-diastolic LV radius
    wall = u(0.05, 0.08)
    ef = u(0.3, 0.45)  # radial shortening fraction
    myo_area = (r_ed + wall) ** 2 - r_ed**2
    rv_dir = u(0.6, 1.2) * rng.choice([-1, 1])
    lung_sep = u(0.35, 0.5)
    liver_c = np.array([u(0.35, 0.5), u(-0.3, 0.0)])
    phase = _smooth_phase(rng, g, u(0.5, 1.5))
    if version == 2:  # drawn after every version-1 parameter: version 1 stays as it was
        static = static * (1 + 0.3 * body_in * np.tanh(1.5 * _smooth_field(rng, tuple(shape), 0.7)))
        for _ in range(int(rng.integers(5, 11))):  # small static vessels in the chest wall / back
            ang, rad = u(0, 2 * np.pi), u(0.55, 0.9)
            vc = np.array([np.cos(ang) * rad * body_semi[0], np.sin(ang) * rad * body_semi[1]])
            vessel = _soft_ellipsoid(g, vc, np.array([u(0.6, 1.2), u(0.6, 1.2)]) * px, 0.0, px)
            static = static * (1 - vessel * body_in) + u(0.8, 1.1) * vessel * body_in
        papillary = [(u(0, 2 * np.pi), u(0.9, 1.4)) for _ in range(int(rng.integers(2, 4)))]
    out = np.empty((frames,) + tuple(shape), np.complex128)
    for i in range(frames):
        shift = np.array([resp[i], 0.0])
        img = static.copy()
        for s in (-1, 1):  # lungs, dark, moving with respiration
            lung = _soft_ellipsoid(g, np.array([-0.1, s * lung_sep]) + shift, np.array([0.45, 0.2]), 0.0, px)
            img = img * (1 - lung * body_in) + 0.05 * lung * body_in
        liver = _soft_ellipsoid(g, liver_c + shift, np.array([0.3, 0.4]), 0.3, px) * body_in
        img = img * (1 - liver) + 0.45 * liver
        c = heart_c + shift
        r_in = r_ed * (1 - ef * w[i])
        r_out = np.sqrt(r_in**2 + myo_area)  # incompressible myocardium thickens in systole
        rv_c = c + (r_out + 0.05) * np.array([np.sin(rv_dir), np.cos(rv_dir)])
        rv_scale = 1 - 0.5 * ef * w[i]
        rv = _soft_ellipsoid(g, rv_c, np.array([0.12, 0.24]) * rv_scale, rv_dir, px)
        rv_wall = _soft_ellipsoid(g, rv_c, np.array([0.12, 0.24]) * rv_scale + 0.02, rv_dir, px)
        epi = _soft_ellipsoid(g, c, np.array([r_out, r_out]), 0.0, px)
        endo = _soft_ellipsoid(g, c, np.array([r_in, r_in]), 0.0, px)
        img = img * (1 - rv_wall) + 0.3 * (rv_wall - rv) + 0.95 * rv  # RV blood with thin wall
        img = img * (1 - epi) + 0.3 * (epi - endo) + 1.0 * endo  # myocardium ring, LV blood
        if version == 2:  # papillary muscles: move with the endocardium, thicken in systole
            for ang, size in papillary:
                pc = c + 0.7 * r_in * np.array([np.cos(ang), np.sin(ang)])
                pap = _soft_ellipsoid(g, pc, np.array([size, size]) * px * (1 + 0.4 * w[i]), 0.0, px) * endo
                img = img * (1 - pap) + 0.3 * pap
        out[i] = img * np.exp(1j * phase)
    return out
