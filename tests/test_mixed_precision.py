"""Mixed precision (issue 13): what runs under bfloat16 autocast and what is refused.

The reversible family inverts in closed form from values the forward pass computed, and the
MEL engine replays the forward's autocast state, so its MEL gradients under autocast are those
of ordinary backprop under autocast, bit for bit. MoDL's fixed-point inverse cannot reach its
float32 tolerance on bfloat16 CNN outputs, so training refuses ``mel`` with 16-bit precision.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import grads_of_step, make_sense_problem, model_config, rel_error
from melrecon.lit.module import check_precision


def _small(name: str, n: int = 6):
    import hydra

    cfg = model_config(name)
    cfg.num_unrolls = n
    for key in ("regularizer", "step_net"):
        if cfg.get(key) is not None:
            cfg[key].width, cfg[key].depth = 6, 3
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg)


def _bf16_grads(net, prob):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return grads_of_step(net, prob)


@pytest.mark.parametrize("name,layout", [("rev_cine", "cine"), ("rev3d_slab", "slab")])
def test_reversible_mel_under_bf16_autocast_inverts_exactly(name, layout):
    """MEL under bf16 autocast: no drift, no fallback, gradients bitwise those of checkpointing
    (which re-runs the forward from stored inputs); both within bfloat16 rounding of ordinary
    backprop (re-running a bf16 CNN for its weight gradient is not a bitwise replay: the
    parameter gradients differ by ~1e-3 relative, the size of bf16 vs float32 itself)."""
    prob = make_sense_problem(layout)
    net = _small(name)
    net.chain.memory = "standard"
    ref, out_ref = _bf16_grads(net, prob)
    f32, _ = grads_of_step(net, prob)
    net.chain.memory = "checkpoint"
    ckpt, _ = _bf16_grads(net, prob)
    net.chain.memory = "mel"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not converge", no fallback
        got, out = _bf16_grads(net, prob)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(got, ckpt))  # the inverse recomputed every input exactly
    stats = net.log_stats()
    assert stats["mel/drift"] == 0.0 and stats["mel/fallbacks"] == 0.0
    assert torch.equal(got[0], ref[0])  # input gradient: bitwise backprop
    bf16_level = rel_error(ref[1:], f32[1:])  # what autocast itself changes
    assert rel_error(got[1:], ref[1:]) <= bf16_level
    check_precision(net, "bf16-mixed")  # accepted


def test_modl_mel_with_16bit_precision_is_refused_in_one_line(compose_cfg):
    net = _small("modl_cine", n=3)
    assert net.memory == "mel" and not net.exact_inverse
    for precision in ("bf16-mixed", "16-mixed"):
        with pytest.raises(ValueError, match="model.memory=checkpoint") as err:
            check_precision(net, precision)
        assert "\n" not in str(err.value)
    check_precision(net, "32-true")
    net.chain.memory = "checkpoint"
    check_precision(net, "bf16-mixed")  # recomputation by a forward pass: no inverse needed
    # the training application stops at setup, before any step
    from melrecon.lit import app

    cfg = compose_cfg("debug=tiny", "logger=none", "trainer.precision=bf16-mixed", "trainer.fast_dev_run=true")
    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed with model.memory=mel") as run_err:
        app.run(cfg)
    assert app.user_error_message(run_err.value) == str(run_err.value)  # train.py prints it as one line


def test_reversible_trains_with_bf16_mixed(compose_cfg):
    from melrecon.lit import app

    cfg = compose_cfg("debug=tiny", "logger=none", "model=rev_cine", "trainer.precision=bf16-mixed",
                      "trainer.fast_dev_run=true")
    metrics = app.run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
