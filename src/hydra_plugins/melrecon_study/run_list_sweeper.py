"""Hydra sweeper ``hydra/sweeper=melrecon_run_list``: launch a *list* of jobs, each with its own overrides.

Hydra's basic sweeper launches the Cartesian product of the command line's comma lists; a study
is instead a list of different training runs (another experiment, depth or width per run). This
sweeper reads the list from a JSON file written by :mod:`melrecon.study` and hands it, as one
batch, to whatever launcher is configured (``hydra/launcher=basic`` runs the jobs one after
another in this process, ``hydra/launcher=slurm`` submits them as a SLURM job array), so a
study scales out exactly like ``python train.py -m``::

    python train.py -m hydra/sweeper=melrecon_run_list hydra.sweeper.runs_file=RUNS.json \
        hydra.sweep.dir=STUDY/runs [hydra/launcher=slurm ...]

``RUNS.json`` is ``{"runs": [{"name": str, "overrides": [str, ...]}, ...]}``. Job ``name`` runs
in ``hydra.sweep.dir/name`` with the command line's overrides followed by its own. Every job
runs through :class:`melrecon.study.job.StudyJob`, which trains (``train.py``'s task function)
and then scores the chosen checkpoint on the test split. A failed job does not stop the others;
the sweep raises at the end naming every failed run.

This module lives in the ``hydra_plugins`` namespace because Hydra only instantiates sweepers
from there; it imports nothing heavy, since Hydra imports every plugin at start-up.
"""


import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class RunListSweeperConf:
    _target_: str = "hydra_plugins.melrecon_study.run_list_sweeper.RunListSweeper"
    runs_file: Optional[str] = None  # JSON written by melrecon.study (see the module docstring)


ConfigStore.instance().store(group="hydra/sweeper", name="melrecon_run_list", node=RunListSweeperConf,
                             provider="melrecon")


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The run list of ``path``; ValueError naming the file and the entry at fault."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hydra.sweeper.runs_file: no file {path}")
    runs = json.loads(path.read_text()).get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path}: expected {{'runs': [...]}} with at least one run")
    names = set()
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("overrides"), list):
            raise ValueError(f"{path}: runs[{i}] must be {{'name': str, 'overrides': [str, ...]}}, got {r!r}")
        if r["name"] in names or "/" in r["name"] or r["name"] in ("", ".", ".."):
            raise ValueError(f"{path}: runs[{i}]: name {r['name']!r} is empty, repeated or not a folder name")
        names.add(r["name"])
    return runs


class RunListSweeper(Sweeper):
    """Launch the jobs listed in ``runs_file`` as one batch through the configured launcher."""

    def __init__(self, runs_file: Optional[str] = None) -> None:
        super().__init__()
        self.runs_file = runs_file
        self.launcher: Optional[Launcher] = None
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from melrecon.study.job import StudyJob  # imported here: Hydra imports plugins at start-up

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=StudyJob(task_function, self.runs_file), config=config)

    def sweep(self, arguments: List[str]) -> List[JobReturn]:
        assert self.launcher is not None and self.config is not None
        if not self.runs_file:
            raise HydraException("hydra/sweeper=melrecon_run_list needs hydra.sweeper.runs_file=PATH")
        try:
            runs = read_runs(self.runs_file)
        except ValueError as err:
            raise HydraException(str(err)) from None
        batch: List[Sequence[str]] = [
            [*arguments, *r["overrides"], f"hydra.sweep.subdir={r['name']}"] for r in runs]
        log.info("melrecon study: launching %d run(s) into %s", len(batch), self.config.hydra.sweep.dir)
        results = list(self.launcher.launch(batch, initial_job_idx=0))
        failed = [(r["name"], res) for r, res in zip(runs, results) if res.status != JobStatus.COMPLETED]
        if failed:
            lines = [f"{name}: {type(res._return_value).__name__}: {res._return_value}" for name, res in failed]
            raise HydraException(f"{len(failed)} of {len(runs)} study run(s) failed:\n  " + "\n  ".join(lines))
        return results
