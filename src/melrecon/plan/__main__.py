"""``python -m melrecon.plan [--shape ...] [--coils C] [OVERRIDES ...]`` (``melrecon plan``): the plan
table ``model.memory=auto`` would print for a training config, without training.

OVERRIDES are train.py's Hydra overrides (``model=rev_cine``, ``+experiment=knee3d_rev_slab``,
``trainer.memory_budget_gb=24``). The item shape comes from the first training file of the data
config (synthetic data are generated on first use), or from ``--shape`` and ``--coils`` (no data
needed: e.g. a paper-size volume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

CONF = Path(__file__).resolve().parents[3] / "conf"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m melrecon.plan", description=__doc__.split("\n\n")[0],
                                 epilog="example: melrecon plan --shape 320 256 32 --coils 8 +experiment=knee3d_rev_slab "
                                        "trainer.memory_budget_gb=24")
    ap.add_argument("overrides", nargs="*", help="train.py overrides")
    ap.add_argument("--shape", nargs="+", type=int, default=None,
                    help="one item's image shape without the batch axis: X Y Z (slab/volume) or T X Y (cine)")
    ap.add_argument("--coils", type=int, default=None, help="coils (with --shape)")
    ap.add_argument("--config-dir", default=str(CONF), help="the Hydra config tree")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from melrecon.plan.config import item_shape, table_for

    if (args.shape is None) != (args.coils is None):
        print("melrecon plan: give --shape and --coils together (or neither: the data config's first training file)",
              file=sys.stderr)
        return 2
    try:
        with initialize_config_dir(config_dir=str(Path(args.config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(args.overrides))
        with open_dict(cfg):
            cfg.model.memory = "auto"
        if args.shape is not None:
            image, coils = tuple(args.shape), args.coils
        else:
            import hydra

            image, coils = item_shape(hydra.utils.instantiate(cfg.data))
        table = table_for(cfg, image, coils)
    except ValueError as e:
        print(f"melrecon plan: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(table.format())
    if table.chosen is None:
        print(table.refusal())
        return 1
    print(f"chosen: {table.chosen.plan.label()} -> overrides: {' '.join(overrides_of(table))}")
    return 0


def overrides_of(table) -> list[str]:
    """The chosen plan as train.py overrides."""
    p = table.chosen.plan
    out = [f"model.memory={p.memory}"]
    if p.memory == "mel":
        out.append(f"model.anchor_every={p.anchor_every if p.anchor_every is not None else 'null'}")
    out.append(f"model.regularizer.tile={list(p.tile) if p.tile is not None else 'null'}".replace(" ", ""))
    out.append(f"model.dc_chunk={p.dc_chunk if p.dc_chunk is not None else 'null'}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
