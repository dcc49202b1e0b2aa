"""Reversible vs MoDL on the same small synthetic cine set, same unrolls, same budget.

Both networks are built from their Hydra model configs (conf/model/modl_cine.yaml and
conf/model/rev_cine.yaml, narrowed for the CPU), trained with Adam for the same number of
steps on the same items in the same order, and scored by validation PSNR (magnitudes, data
range of the whole target series, as in melrecon.metrics). The reversible network trains
under pure MEL (no anchors); MoDL under standard backprop (memory modes do not change the
gradients, so this is the same training as any other mode).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import model_config

ROOT = Path(__file__).resolve().parents[1]
UNROLLS, WIDTH, STEPS = 5, 8, 100


def _model(name: str, **over):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = model_config(name)
    cfg.merge_with(OmegaConf.create(over))
    return instantiate(cfg)


def _evaluate(net, items) -> float:
    from melrecon.metrics import volume_metrics

    psnrs = []
    with torch.no_grad():
        for b in DataLoader(items, batch_size=1):
            out = net(b.x0, b.kspace, b.maps, b.mask)
            psnrs.append(volume_metrics(out, b.target, float(b.max))["psnr"])
    return sum(psnrs) / len(psnrs)


def _train(net, items, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for b in DataLoader(items, batch_size=1, shuffle=True, generator=order):
            out = net(b.x0, b.kspace, b.maps, b.mask)
            loss = (out - b.target).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break


@pytest.mark.slow
def test_reversible_matches_modl_psnr_on_synthetic_cine(tmp_path, capsys):
    from melrecon.data.datasets import CineDataset
    from melrecon.data.synthetic import generate_dataset

    torch.set_num_threads(1)  # the machine is shared; also makes timings comparable
    files = generate_dataset(tmp_path / "cine", "cine", preset="tiny", seed=0, progress=False,
                             shape=(24, 24), frames=6, num_train=8, num_val=3, num_test=1)
    train = CineDataset(files["train"], train=True, accelerations=4.0, calib=4)
    val = CineDataset(files["val"], train=False, accelerations=4.0, calib=4)
    zero_filled = _evaluate(lambda x0, k, s, m: x0, val)

    torch.manual_seed(0)
    modl = _model("modl_cine", num_unrolls=UNROLLS, memory="standard",
                  regularizer=dict(width=WIDTH, lipschitz=None))
    _train(modl, train, STEPS)
    psnr_modl = _evaluate(modl, val)

    torch.manual_seed(0)
    rev = _model("rev_cine", num_unrolls=UNROLLS, memory="mel", regularizer=dict(width=WIDTH))
    _train(rev, train, STEPS)
    psnr_rev = _evaluate(rev, val)
    stats = rev.log_stats()

    with capsys.disabled():
        print(f"\n[reversible vs MoDL] N={UNROLLS} width={WIDTH} steps={STEPS}: zero-filled "
              f"{zero_filled:.2f} dB, MoDL {psnr_modl:.2f} dB, reversible {psnr_rev:.2f} dB "
              f"(drift {stats['mel/drift']:.2g}, anchors {stats['mel/anchors']:.0f})")
    assert psnr_modl > zero_filled + 2.0  # both actually learned something
    assert psnr_rev > zero_filled + 2.0
    assert psnr_rev >= psnr_modl - 0.3
    assert stats["mel/anchors"] == 0 and stats["mel/fallbacks"] == 0 and stats["mel/drift"] <= 1e-5
