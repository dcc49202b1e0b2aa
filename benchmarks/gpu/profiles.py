"""The kit's two size profiles in one place: ``paper`` (the GPU figures) and ``tiny`` (the CPU test).

``run.sh`` picks ``tiny`` with ``--tiny`` and ``paper`` otherwise; ``bench.py`` and
``train_runs.py`` read everything size-related from here, so switching the tiny training runs to
the Hydra ``debug=tiny`` group (issue 10) is one edit of ``TRAIN_OVERRIDES["tiny"]``.
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
#: Both: one epoch of a few steps and one validation batch, logged every step.
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
    # = tests/conftest.py TINY_DATA + TINY_MODEL; after issue 10: ["debug=tiny"]
    "tiny": [
        *_SHORT_RUN,
        "data.synthetic.preset=tiny",
        "data.calib=4",
        "data.accelerations=[4]",
        "data.eval_acceleration=4",
        "data.batch_size=1",
        "model.num_unrolls=2",
        "model.regularizer.width=4",
    ],
}

#: The bf16-mixed runs: one MoDL and one reversible experiment. On GPU the MoDL one trains with
#: MEL (does the fixed-point inverse still converge with a bf16 CNN?). The CPU test takes the
#: MoDL experiment with standard backprop instead: there the bf16 CNN stops the inverse short of
#: its float32 tolerance, so MEL recomputes every step by a forward pass, and bf16 convolutions on
#: CPU are slow (25 s a step even at tiny sizes) -- the GPU run is the one that measures this.
BF16_EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "paper": ("knee3d_slab", "cine_rev_unroll50"),
    "tiny": ("cine_unroll5", "cine_rev_unroll50"),
}
