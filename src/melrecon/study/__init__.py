"""Studies: the paper's comparisons reproduced by one command (``python -m melrecon.study NAME``).

A study (``conf/study/NAME.yaml``) is a list of training runs plus classical baselines, trained
with one budget and scored per volume on a test split that no run saw; or, for
``memory_modes``, a sweep of memory and time measurements. See ``docs/studies.md``, "Reproducing the
paper", and the module docs of :mod:`melrecon.study.runner`.
"""
