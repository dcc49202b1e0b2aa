"""Optuna samplers for studies that are continued (``hparams_search=cine_optuna`` run again).

A sampler with a fixed seed replays the same random numbers in every process: a continued
study (same storage and name) would try trial 0's parameters again, then trial 1's, ... and
waste its startup trials. :class:`ContinuedTPESampler` seeds Optuna's TPE sampler with the
configured seed plus the number of the first trial it samples (the trials the study already
holds), so a fresh study is reproducible from the seed and every continuation draws new points
(and is itself reproducible, given the study). The sampler learns that number from the study
Optuna hands it, so it needs neither the storage nor the study name.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.samplers import BaseSampler, TPESampler


class ContinuedTPESampler(BaseSampler):
    """``TPESampler(seed=seed + first trial number, **kwargs)``, made when the first trial asks.

    ``seed=None`` keeps Optuna's unseeded behaviour. Used as ``hydra.sweeper.sampler._target_``.
    """

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        self.seed = None if seed is None else int(seed)
        self.kwargs = kwargs
        self._inner: TPESampler | None = None

    def _sampler(self, trial: optuna.trial.FrozenTrial) -> TPESampler:
        if self._inner is None:
            seed = None if self.seed is None else self.seed + int(trial.number)
            self._inner = TPESampler(seed=seed, **self.kwargs)
        return self._inner

    def infer_relative_search_space(self, study, trial):  # type: ignore[override]
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # type: ignore[override]
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # type: ignore[override]
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):  # type: ignore[override]
        if self._inner is not None:
            self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._inner is not None:
            self._inner.reseed_rng()


__all__ = ["ContinuedTPESampler"]
