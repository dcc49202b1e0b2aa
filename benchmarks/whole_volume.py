"""Whole-volume training memory: probe peak versus volume size and CNN tile, and the memory
model's prediction (melrecon.models.memory_model) at the paper's scale.

For each volume (X, Y, Z) and tile, one MoDL training step (forward, loss, backward) of a
whole-volume problem is run after one warm-up step and reported: the peak of the bytes
autograd holds (MemoryProbe; on CUDA also the allocator's peak), the model's prediction of
that peak (``model MB``; exact on the probe), the part of it that is one CNN graph
(``graph MB``: the tile's, halo included, when tiled; the rest is volume-sized images), the
predicted device peak, the number of tiles and the step time.  At a fixed tile the graph
stays put while the volume grows; untiled it grows with the volume.  Then the model's prediction for
the paper's whole knee (320 x 256 x 320, 8 coils, width 64, N = 10) per mode, untiled and
with the tile it chooses for a 20 GB budget.

    python benchmarks/whole_volume.py                                   # small CPU sizes (~1.5 min)
    python benchmarks/whole_volume.py --device cuda --volumes 64,64,64 128,128,128 \
        --tiles none 64,64,64 --width 64 --coils 8 --unrolls 10     # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from melrecon.bench import measure_step  # noqa: E402
from melrecon.models import ProximalDC, ResidualCNN, UnrolledNet  # noqa: E402
from melrecon.models.memory_model import MODES, choose_tile, predict_peak  # noqa: E402
from melrecon.physics.problems import random_sense_problem  # noqa: E402

PAPER = dict(volume=(320, 256, 320), coils=8, width=64, depth=5, num_unrolls=10)


def _shape(text: str) -> tuple[int, ...] | None:
    """'16,16,16' -> (16, 16, 16); 'none' -> None (untiled)."""
    if text.lower() == "none":
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z or none, got {text!r}") from None


def measure(volume: Sequence[int], tile: tuple[int, ...] | None, opts: dict[str, Any]) -> dict[str, Any]:
    """One whole-volume training step after a warm-up step: probe peak, prediction, time."""
    device = torch.device(opts["device"])
    dtype = torch.complex128 if opts["double"] else torch.complex64
    prob = random_sense_problem("slab", volume, opts["coils"], dtype, device=device, seed=1)
    torch.manual_seed(0)
    reg = ResidualCNN(3, opts["width"], opts["depth"], lipschitz=0.9, tile=tile)
    net = UnrolledNet(reg, ProximalDC(lam_init=1.0), opts["unrolls"], True, opts["memory"], anchor_every=None,
                      dc_chunk=opts["dc_chunk"]).to(device)
    if opts["double"]:
        net = net.double()
    m = measure_step(net, prob, warmup=1)  # norm estimates start on the first call
    pred = predict_peak(volume, coils=opts["coils"], width=opts["width"], depth=opts["depth"],
                        num_unrolls=opts["unrolls"], memory=opts["memory"], tile=tile,
                        real_bytes=8 if opts["double"] else 4, dc_chunk=opts["dc_chunk"])
    return {
        "volume": "x".join(map(str, volume)),
        "tile": "none" if tile is None else "x".join(map(str, tile)),
        "tiles": pred.tiles,
        "probe_MB": m.probe_peak_bytes / 2**20,
        "model_MB": pred.probe_bytes / 2**20,
        "graph_MB": pred.terms["cnn_graph"] / 2**20,  # one CNN graph: the tile's (+ halo) when tiled
        "pred_peak_MB": pred.peak_bytes / 2**20,
        "cuda_MB": m.cuda_peak_bytes / 2**20 if m.cuda_peak_bytes is not None else float("nan"),
        "time_s": m.time_s,
    }


def paper_prediction(budget_gb: float, dc_chunk: int | None) -> list[str]:
    """The model's prediction for the paper's whole knee, per mode, untiled and tiled."""
    kw = dict(coils=PAPER["coils"], width=PAPER["width"], depth=PAPER["depth"], num_unrolls=PAPER["num_unrolls"],
              real_bytes=4, dc_chunk=dc_chunk)
    vol = PAPER["volume"]
    lines = [f"prediction: volume {vol}, {PAPER['coils']} coils, CNN {PAPER['depth']} x {PAPER['width']}, "
             f"N = {PAPER['num_unrolls']}, complex64, dc_chunk {dc_chunk}"]
    for mode in MODES:
        lines.append(f"  {mode:10} untiled            {predict_peak(vol, memory=mode, **kw).summary()}")
    for tile in ((160, 128, 160), (80, 64, 80)):
        lines.append(f"  mel        tile {str(tile):14} {predict_peak(vol, memory='mel', tile=tile, **kw).summary()}")
    tile, pred = choose_tile(budget_gb * 1e9, vol, memory="mel", **kw)
    lines.append(f"  mel, budget {budget_gb:g} GB: tile {tile}: {pred.summary()}")
    if dc_chunk is None:  # the whole-volume experiments' setting
        kw["dc_chunk"] = 32
        pred = predict_peak(vol, memory="mel", tile=(160, 128, 160), **kw)
        lines.append(f"  mel        tile (160, 128, 160), dc_chunk 32: {pred.summary()}")
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # at a fixed tile the graph is the same once every volume has an interior tile (tile + 2 halo)
    ap.add_argument("--volumes", nargs="+", type=_shape, default=[(18, 18, 18), (36, 18, 18), (36, 36, 18)])
    ap.add_argument("--tiles", nargs="+", type=_shape, default=[None, (6, 6, 6)])
    ap.add_argument("--coils", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3, help="convs per CNN (halo = depth on each side for kernel 3)")
    ap.add_argument("--unrolls", type=int, default=3)
    ap.add_argument("--memory", default="mel", choices=MODES)
    ap.add_argument("--dc-chunk", type=int, default=None)
    ap.add_argument("--double", action="store_true", help="complex128 (default complex64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gb", type=float, default=20.0)
    args = ap.parse_args(argv)
    if any(v is None for v in args.volumes):
        ap.error("--volumes: every entry must be X,Y,Z")
    opts = dict(coils=args.coils, width=args.width, depth=args.depth, unrolls=args.unrolls, memory=args.memory,
                dc_chunk=args.dc_chunk, double=args.double, device=args.device)
    print(f"device={args.device} {'complex128' if args.double else 'complex64'} coils={args.coils} width={args.width} "
          f"depth={args.depth} N={args.unrolls} memory={args.memory} dc_chunk={args.dc_chunk} "
          f"threads={torch.get_num_threads()}")
    head = f"{'volume':>10} {'tile':>8} {'tiles':>5} {'probe MB':>9} {'model MB':>9} {'graph MB':>9} " \
           f"{'pred peak MB':>12} {'cuda MB':>8} {'time s':>7}"
    print(head)
    rows = []
    for volume in args.volumes:
        for tile in args.tiles:
            r = measure(volume, tile, opts)
            rows.append(r)
            print(f"{r['volume']:>10} {r['tile']:>8} {r['tiles']:>5} {r['probe_MB']:9.3f} {r['model_MB']:9.3f} "
                  f"{r['graph_MB']:9.3f} {r['pred_peak_MB']:12.3f} {r['cuda_MB']:8.1f} "
                  f"{r['time_s']:7.2f}", flush=True)
    for line in paper_prediction(args.budget_gb, args.dc_chunk):
        print(line)
    return rows


if __name__ == "__main__":
    main()
