"""``python -m melrecon.study NAME [key=value ...] [-- train.py overrides ...]``

Runs (or continues) the study ``conf/study/NAME.yaml``. ``key=value`` override the study config
(``preset=tiny|cpu|paper``, ``budget.max_steps=100``, ``out_dir=...``, ``launcher.name=slurm``);
arguments after ``--`` go to every training run (``trainer=gpu``, ``data=knee3d
data.root=/data/knee``), or, if they start with ``hydra``, to the multirun (``hydra/launcher=slurm
hydra.launcher.partition=gpu``). ``python -m melrecon.study --list`` lists the studies. Also
``melrecon study ...`` (the console script).
"""

from __future__ import annotations

import argparse
import logging
import sys

from melrecon.study.config import StudyError, study_names


def build_parser() -> argparse.ArgumentParser:
    """The options before ``--`` (what follows ``--`` goes to the training runs unparsed)."""
    parser = argparse.ArgumentParser(
        prog="python -m melrecon.study", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run or continue a study (conf/study/NAME.yaml): training runs with one budget, "
                    "classical baselines, paired statistics, tables and plots.",
        usage="%(prog)s NAME [key=value ...] [-- train.py overrides ...] | --list")
    parser.add_argument("name", nargs="?", help="the study (conf/study/NAME.yaml; --list shows them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="study config overrides, e.g. preset=tiny budget.max_steps=100 out_dir=...")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1:]
    parser = build_parser()
    opts = parser.parse_args(args)
    if opts.list:
        print("\n".join(study_names()))
        return 0
    if not opts.name:
        parser.print_usage(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    from melrecon.study.runner import run_study

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        out = run_study(opts.name, opts.overrides, extra)
    except (StudyError, HydraException, OmegaConfBaseException) as err:  # config mistakes: one line
        print(f"melrecon.study: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"study {opts.name}: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
