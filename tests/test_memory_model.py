"""The memory model of a MoDL training step (melrecon.models.memory_model) against the probe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from melrecon.bench import training_step
from melrecon.mel import MemoryProbe
from melrecon.models import ProximalDC, ResidualCNN, UnrolledNet
from melrecon.models.memory_model import choose_tile, main, predict_peak
from melrecon.physics.problems import random_sense_problem

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_whole_volume", ROOT / "benchmarks" / "whole_volume.py")
whole_volume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(whole_volume)

SLACK = 256  # bytes: the model leaves out the 0-dim tensors graphs save (lam, norm scales: 8 bytes each)


def measured_peak(volume, coils, width, depth, n, memory, tile):
    prob = random_sense_problem("slab", volume, coils, torch.complex128, seed=1)
    torch.manual_seed(0)
    reg = ResidualCNN(3, width, depth, lipschitz=0.9, tile=tile)
    net = UnrolledNet(reg, ProximalDC(lam_init=1.0), n, True, memory, anchor_every=None).double()
    training_step(net, prob)  # the norm estimates start on the first call
    net.zero_grad(set_to_none=True)
    with MemoryProbe() as probe:
        training_step(net, prob)
    return probe.peak_bytes


@pytest.mark.parametrize("memory", ["standard", "checkpoint", "mel"])
@pytest.mark.parametrize("tile", [None, (4, 4, 4), (3, 8, 5)])
@pytest.mark.parametrize("n", [1, 3])
def test_model_predicts_probe_peak(memory, tile, n):
    """ResidualCNN, untiled and tiled (width 4, depth 3, 2 coils)."""
    volume = (8, 8, 8) if tile != (3, 8, 5) else (7, 8, 10)
    got = measured_peak(volume, 2, 4, 3, n, memory, tile)
    pred = predict_peak(volume, coils=2, width=4, depth=3, num_unrolls=n, memory=memory, tile=tile, real_bytes=8)
    assert 0 <= got - pred.probe_bytes <= SLACK, (pred.probe_bytes, got, pred.phases)


def test_model_scales_like_the_probe_with_width_depth_and_volume():
    for volume, width, depth in (((12, 6, 6), 6, 4), ((6, 10, 8), 3, 2)):
        for memory, tile in (("mel", None), ("mel", (5, 4, 4)), ("checkpoint", (4, 5, 3))):
            got = measured_peak(volume, 3, width, depth, 2, memory, tile)
            pred = predict_peak(volume, coils=3, width=width, depth=depth, num_unrolls=2, memory=memory,
                                tile=tile, real_bytes=8)
            assert 0 <= got - pred.probe_bytes <= SLACK, (volume, width, depth, memory, tile, pred.probe_bytes, got)


def test_tiling_bounds_the_prediction_and_paper_volume_fits_20gb():
    kw = dict(coils=8, width=64, depth=5, num_unrolls=10, memory="mel", real_bytes=4)
    volume = (320, 256, 320)
    untiled = predict_peak(volume, **kw)
    tiled = predict_peak(volume, tile=(160, 128, 160), **kw)
    assert untiled.peak_bytes > 40e9  # one 64-channel CNN graph over the whole volume
    assert tiled.peak_bytes <= 20e9 and tiled.tiles == 8
    # at a fixed tile the CNN graph is the tile's, whatever the volume (both have interior tiles)
    small = predict_peak((240, 192, 240), tile=(80, 64, 80), **kw)
    large = predict_peak((320, 256, 320), tile=(80, 64, 80), **kw)
    assert large.terms["cnn_graph"] == small.terms["cnn_graph"] < tiled.terms["cnn_graph"]
    tile, pred = choose_tile(20e9, volume, **kw)
    assert tile is not None and pred.peak_bytes <= 20e9
    assert choose_tile(1e15, volume, **kw)[0] is None  # the untiled step fits a huge budget


def test_cli_prints_modes_and_chosen_tile(capsys):
    tile, pred = main(["--volume", "320", "256", "320", "--budget-gb", "20"])
    out = capsys.readouterr().out
    assert f"budget 20 GB: tile {tile}" in out and "checkpoint" in out and pred.peak_bytes <= 20e9


def test_model_rejects_bad_arguments():
    good = dict(volume=(8, 8, 8), coils=2, width=4, depth=3, num_unrolls=2, memory="mel")
    for key, bad, match in (("memory", "fast", "memory"), ("depth", 1, "depth"), ("coils", 0, "coils"),
                            ("volume", (8, 0, 8), "volume"), ("real_bytes", 3, "real_bytes"),
                            ("kernel_size", 4, "kernel_size")):
        with pytest.raises(ValueError, match=match):
            predict_peak(**{**good, key: bad})
    with pytest.raises(ValueError, match="no tile keeps"):
        choose_tile(1e3, (64, 64, 64), coils=8, width=64, depth=5, num_unrolls=2, memory="mel")


def test_dc_chunk_shrinks_only_the_dc_workspace():
    kw = dict(coils=8, width=64, depth=5, num_unrolls=10, memory="mel", tile=(160, 128, 160))
    whole = predict_peak((320, 256, 320), **kw)
    chunked = predict_peak((320, 256, 320), dc_chunk=32, **kw)
    dc = {p.name: p.workspace for p in whole.phases}, {p.name: p.workspace for p in chunked.phases}
    name = "backward (MEL, by inversion): DC solve of one unroll"
    assert dc[1][name] < dc[0][name] / 2 and chunked.probe_bytes == whole.probe_bytes
    with pytest.raises(ValueError, match="dc_chunk"):
        predict_peak((8, 8, 8), dc_chunk=0, **kw)


def test_whole_volume_benchmark_graph_is_flat_in_volume_at_fixed_tile(capsys):
    """benchmarks/whole_volume.py: probe == model in every row; at a fixed tile (every volume
    has an interior tile) the CNN graph is one size for 1x and 2x volumes; untiled it grows."""
    rows = whole_volume.main(["--volumes", "9,9,9", "18,9,9", "--tiles", "none", "3,3,3", "--depth", "2",
                              "--width", "2", "--coils", "2", "--unrolls", "2"])
    assert all(abs(r["probe_MB"] - r["model_MB"]) * 2**20 <= SLACK for r in rows)
    tiled = [r["graph_MB"] for r in rows if r["tile"] != "none"]
    plain = [r["graph_MB"] for r in rows if r["tile"] == "none"]
    assert tiled[0] == tiled[1] < plain[0] < plain[1]
    assert "prediction: volume (320, 256, 320)" in capsys.readouterr().out
