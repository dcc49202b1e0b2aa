"""``python -m melrecon.study NAME [key=value ...] [-- train.py overrides ...]``

Runs (or continues) the study ``conf/study/NAME.yaml``. ``key=value`` override the study config
(``preset=tiny|cpu|paper``, ``budget.max_steps=100``, ``out_dir=...``, ``launcher.name=slurm``);
arguments after ``--`` go to every training run (``trainer=gpu``, ``data=knee3d
data.root=/data/knee``), or, if they start with ``hydra``, to the multirun (``hydra/launcher=slurm
hydra.launcher.partition=gpu``). ``python -m melrecon.study --list`` lists the studies.
"""

from __future__ import annotations

import logging
import sys

from melrecon.study.config import StudyError, study_names


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    if args[0] == "--list":
        print("\n".join(study_names()))
        return 0
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1:]
    name, overrides = args[0], args[1:]
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
    from melrecon.study.runner import run_study

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        out = run_study(name, overrides, extra)
    except (StudyError, HydraException, OmegaConfBaseException) as err:  # config mistakes: one line
        print(f"melrecon.study: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"study {name}: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
