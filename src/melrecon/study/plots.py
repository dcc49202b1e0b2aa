"""Study figures (matplotlib, PNG): quality vs unrolls, cost vs unrolls, metrics per method, an
image panel with error maps, and the memory-modes figure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from melrecon.study.results import MethodResult  # noqa: E402
from melrecon.study.stats import summarize, t_interval  # noqa: E402

_DPI = 110


def _values(m: MethodResult, metric: str) -> list[float]:
    return [s[metric] for s in m.scores.values() if metric in s]


def _errorbar(values: list[float]) -> float:
    """Half-width of the 95% t interval of the mean (0 when it does not exist)."""
    lo, hi = t_interval(values)
    return 0.0 if math.isnan(lo) else (hi - lo) / 2


def psnr_vs_unrolls(methods: Sequence[MethodResult], path: Path, metric: str = "psnr") -> Path | None:
    """Mean test ``metric`` (95% t interval of the mean) against unrolls, one line per network
    family and memory mode; baselines as horizontal lines. None if fewer than two depths."""
    nets = [m for m in methods if m.group == "network"]
    if len({m.settings.get("num_unrolls") for m in nets}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for family in sorted({m.settings["family"] for m in nets}):
        ms = sorted((m for m in nets if m.settings["family"] == family), key=lambda m: m.settings["num_unrolls"])
        x = [m.settings["num_unrolls"] for m in ms]
        y = [summarize(_values(m, metric)).mean for m in ms]
        ax.errorbar(x, y, yerr=[_errorbar(_values(m, metric)) for m in ms], marker="o", capsize=3, label=family)
    for i, m in enumerate(b for b in methods if b.group == "baseline"):
        ax.axhline(summarize(_values(m, metric)).mean, ls="--", lw=1, color=f"C{i + 3}", label=m.label)
    ax.set_xscale("log")
    depths = sorted({m.settings["num_unrolls"] for m in nets})
    ax.set_xticks(depths, [str(n) for n in depths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("unrolls N")
    ax.set_ylabel(f"test {metric.upper()}" + (" (dB)" if metric == "psnr" else ""))
    ax.set_title(f"{metric.upper()} vs depth (mean, 95% CI over test volumes)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def cost_vs_unrolls(methods: Sequence[MethodResult], path: Path) -> Path | None:
    """Autograd memory of one training step and median step time against unrolls, per family
    and memory mode, for the trained networks. None if fewer than two depths."""
    nets = [m for m in methods if m.group == "network"]
    if len({m.settings.get("num_unrolls") for m in nets}) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    groups = sorted({(m.settings["family"], m.settings["memory"]) for m in nets})
    for family, memory in groups:
        ms = sorted((m for m in nets if (m.settings["family"], m.settings["memory"]) == (family, memory)),
                    key=lambda m: m.settings["num_unrolls"])
        x = [m.settings["num_unrolls"] for m in ms]
        axes[0].plot(x, [m.info.get("probe_step_mib", math.nan) for m in ms], marker="o", label=f"{family} {memory}")
        axes[1].plot(x, [m.info.get("step_time_s", math.nan) for m in ms], marker="o", label=f"{family} {memory}")
    axes[0].set_ylabel("autograd memory of a step (MiB)")
    axes[1].set_ylabel("median step time (s)")
    for ax in axes:
        ax.set_xlabel("unrolls N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


_MODE_MARKERS = {"standard": "o", "checkpoint": "s", "mel": "^"}


def psnr_vs_memory(points: Sequence[Any], baselines: Sequence[MethodResult], path: Path) -> Path | None:
    """Test PSNR (mean, 95% t interval) against the memory of a training step, one colour per
    network, one marker per memory mode (``equal_memory.MemoryPoint``s); baselines as
    horizontal lines. None without points."""
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    nets = list(dict.fromkeys(p.method.name for p in points))
    for p in points:
        values = _values(p.method, "psnr")
        c = f"C{nets.index(p.method.name) % 10}"
        ax.errorbar([p.mib], [summarize(values).mean], yerr=[_errorbar(values)], color=c, capsize=3,
                    marker=_MODE_MARKERS.get(p.mode, "x"), ls="none")
    for name in nets:  # one line per network joins its modes: same quality, different memory
        ps = sorted((p for p in points if p.method.name == name), key=lambda p: p.mib)
        ax.plot([p.mib for p in ps], [summarize(_values(p.method, "psnr")).mean for p in ps], lw=0.8,
                color=f"C{nets.index(name) % 10}", label=ps[0].method.label)
    for mode, marker in _MODE_MARKERS.items():
        if any(p.mode == mode for p in points):
            ax.plot([], [], marker=marker, ls="none", color="k", label=mode)
    for i, m in enumerate(baselines):
        ax.axhline(summarize(_values(m, "psnr")).mean, ls="--", lw=0.8, color="0.5" if i % 2 else "0.7")
        ax.annotate(m.label, (0.01, summarize(_values(m, "psnr")).mean), xycoords=("axes fraction", "data"),
                    fontsize=6, color="0.4", va="bottom")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=6)
    basis = sorted({p.basis for p in points})
    ax.set_xlabel(f"memory of one training step (MiB, {' / '.join(basis)})")
    ax.set_ylabel("test PSNR (dB)")
    ax.set_title("quality at equal memory (mean, 95% CI over test volumes)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def validation_curves(methods: Sequence[MethodResult], path: Path) -> Path | None:
    """Validation PSNR against the training step, one line per network. None without curves."""
    nets = [m for m in methods if m.group == "network" and m.curve]
    if not nets:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for m in nets:
        ax.plot([s for s, _ in m.curve], [v for _, v in m.curve], marker="o", ms=2.5, label=m.label)
    last = max(m.curve[-1][0] for m in nets)
    ax.axvline(0.75 * last, ls=":", color="0.5", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title("validation PSNR during training (dotted: start of the last quarter)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def metrics_by_method(methods: Sequence[MethodResult], path: Path) -> Path:
    """PSNR and SSIM per method: mean with the 95% t interval over test volumes."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [m.label for m in methods]
    for ax, metric in zip(axes, ("psnr", "ssim")):
        means = [summarize(_values(m, metric)).mean for m in methods]
        errs = [_errorbar(_values(m, metric)) for m in methods]
        ax.bar(range(len(methods)), means, yerr=errs, capsize=3,
               color=["C0" if m.group == "network" else "C7" for m in methods])
        ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"test {metric.upper()}" + (" (dB)" if metric == "psnr" else ""))
        finite = [v for v in means if math.isfinite(v)]
        if finite:
            lo = min(finite)
            ax.set_ylim(lo - 0.1 * abs(lo) if metric == "psnr" else max(0.0, lo - 0.1), None)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _views(volume: np.ndarray, kind: str) -> tuple[list[np.ndarray], list[str]]:
    """The two 2D views shown per method: 3D the centre readout plane (Y, Z) and the centre
    (X, Z) plane across the readout positions; cine the centre frame (X, Y) and an x-t profile
    (the column y = Y/2 over time, shown as (X, T))."""
    v = np.abs(volume)
    if kind == "cine":
        if v.ndim == 4:  # (S, T, X, Y): first slice
            v = v[0]
        t, x, y = v.shape
        return [v[t // 2], v[:, :, y // 2].T], [f"frame {t // 2}", f"x-t profile at y={y // 2}"]
    x, y, z = v.shape
    return [v[x // 2], v[:, y // 2, :]], [f"plane x={x // 2} (y, z)", f"plane y={y // 2} (x, z)"]


def image_panel(methods: Sequence[MethodResult], kind: str, path: Path, error_gain: float = 5.0) -> Path | None:
    """One test volume: the target, then one row per method with its two views and their
    error maps |recon| - |target| (magnified ``error_gain`` x, same grey scale for all)."""
    ref = next((m for m in methods if m.panel is not None and "target" in np.load(m.panel).files), None)
    if ref is None:
        return None
    refz = np.load(ref.panel)
    target, volume = refz["target"], str(refz["volume"])
    rows = [("target", target)]
    for m in methods:
        if m.panel is None:
            continue
        z = np.load(m.panel)
        if str(z["volume"]) != volume:
            raise ValueError(f"panel of {m.name} shows {z['volume']}, the others {volume}")
        rows.append((m.label, z["reconstruction"]))
    tviews, names = _views(target, kind)
    vmax = float(max(np.abs(target).max(), 1e-12))
    fig, axes = plt.subplots(len(rows), 4, figsize=(8.5, 2.0 * len(rows)), squeeze=False)
    for r, (label, vol) in enumerate(rows):
        views, _ = _views(vol, kind)
        for c, (img, timg) in enumerate(zip(views, tviews)):
            # the x-t profile has few frames: stretch it to the panel's width
            aspect = "auto" if kind == "cine" and c == 1 else "equal"
            axes[r, 2 * c].imshow(img, cmap="gray", vmin=0, vmax=vmax, aspect=aspect)
            if r == 0:  # the target: no error map
                axes[r, 2 * c].set_title(names[c], fontsize=8)
                axes[r, 2 * c + 1].set_title(f"error x{error_gain:g} (rows below)", fontsize=8)
                axes[r, 2 * c + 1].axis("off")
                continue
            axes[r, 2 * c + 1].imshow(np.abs(img - timg) * error_gain, cmap="gray", vmin=0, vmax=vmax, aspect=aspect)
        axes[r, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path, title=f"test volume {volume}")


def memory_modes(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Peak autograd memory (top) and step time (bottom) against N, one column per network
    family and data kind, one line per memory mode."""
    panels = sorted({(r["family"], r["kind"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 6), squeeze=False)
    for c, (family, kind) in enumerate(panels):
        for mode in ("standard", "checkpoint", "mel"):
            rs = sorted((r for r in rows if (r["family"], r["kind"], r["mode"]) == (family, kind, mode)),
                        key=lambda r: r["N"])
            if not rs:
                continue
            n = [r["N"] for r in rs]
            axes[0, c].plot(n, [r["probe_peak_MB"] for r in rs], marker="o", ms=3, label=mode)
            axes[1, c].plot(n, [r["time_s"] for r in rs], marker="o", ms=3, label=mode)
        axes[0, c].set_title(f"{family} {kind}", fontsize=9)
        axes[1, c].set_xlabel("unrolls N")
    axes[0, 0].set_ylabel("peak autograd memory (MiB)")
    axes[1, 0].set_ylabel("training step time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:  # tight_layout ignores a suptitle: keep a strip of about 0.45 inch free above the axes
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / fig.get_figheight()))
    else:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=_DPI)
    plt.close(fig)
    tmp.replace(path)
    return path
