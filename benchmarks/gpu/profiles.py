"""The kit's two size profiles in one place: ``paper`` (the GPU figures) and ``tiny`` (the CPU test).

``run.sh`` picks ``tiny`` with ``--tiny`` and ``paper`` otherwise; ``bench.py`` and
``train_runs.py`` read everything size-related from here.
"""

from __future__ import annotations

from typing import Any

#: Memory benchmark (bench.py). Sizes: slab (X, Y, Z), cine (T, X, Y); MoDL and reversible unroll
#: counts; the MEL paper's CNN (width 64, depth 5) on 8-coil 3D slabs and cine.
BENCH: dict[str, dict[str, Any]] = {
    "paper": dict(slab=(21, 256, 320), cine=(20, 192, 160), coils=8, width=64, depth=5,
                  unrolls={"modl": (1, 5, 10, 20), "rev": (1, 20, 50, 100)}),
    "tiny": dict(slab=(4, 16, 16), cine=(4, 16, 16), coils=2, width=4, depth=3,
                 unrolls={"modl": (1, 3), "rev": (1, 3)}),
}

#: Training runs (train_runs.py): Hydra overrides added to ``+experiment=NAME trainer=...``.
#: Both profiles: one epoch of a few steps and one validation batch, logged every step.
_SHORT_RUN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
TRAIN_OVERRIDES: dict[str, list[str]] = {
    # the experiment's own network and synthetic data (preset small): paper-width CNNs on GPU
    "paper": [*_SHORT_RUN],
    # the tests' run (conf/debug/tiny.yaml: tiny data, batches of one, one epoch of 2 batches,
    # 4-channel CNNs), plus what it leaves open: one validation batch, and 2 unrolls, since an
    # experiment's own num_unrolls (20, 50) wins over debug's and would dominate the CPU test
    "tiny": ["debug=tiny", "trainer.limit_val_batches=1", "model.num_unrolls=2"],
}

#: The bf16-mixed runs: one MoDL and one reversible experiment. MoDL runs with standard
#: backprop: training refuses MoDL + memory=mel with 16-bit precision (the bf16 CNN stops the
#: fixed-point inverse short of its float32 tolerance, so MEL would recompute every step by a
#: forward pass; README "Mixed precision"); the reversible one runs MEL (exact inverse under
#: autocast). bf16 convolutions on CPU are slow (25 s a step even at tiny sizes) -- the GPU run
#: is the one that measures this.
BF16_EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "paper": ("cine_unroll5", "cine_rev_unroll50"),
    "tiny": ("cine_unroll5", "cine_rev_unroll50"),
}

#: The plan step (plan_step.py): the memory model's prediction against the measured peak.
#: Cases (family, kind, N, mode, anchor_every, tile); sizes from BENCH. Paper: the knee slab and
#: cine at the MEL paper's CNN, MoDL at N = 5 and reversible at N = 20, untiled and tiled.
PLAN: dict[str, list[tuple[str, str, int, str, int | None, tuple[int, ...] | None]]] = {
    "paper": [("modl", "slab", 5, "standard", None, None), ("modl", "slab", 5, "mel", None, None),
              ("modl", "cine", 5, "checkpoint", None, None), ("modl", "slab", 5, "mel", None, (11, 128, 160)),
              ("rev", "slab", 20, "checkpoint", None, None), ("rev", "cine", 20, "mel", None, None),
              ("rev", "slab", 20, "mel", 5, (11, 128, 160))],
    "tiny": [("modl", "slab", 3, "standard", None, None), ("modl", "slab", 3, "mel", None, None),
             ("modl", "cine", 3, "checkpoint", None, None), ("modl", "slab", 3, "mel", None, (2, 8, 8)),
             ("rev", "slab", 3, "checkpoint", None, None), ("rev", "cine", 3, "mel", None, None),
             ("rev", "slab", 3, "mel", 2, (2, 8, 8))],
}
