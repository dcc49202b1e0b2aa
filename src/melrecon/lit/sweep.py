"""Optuna samplers for studies that are continued (``hparams_search=cine_optuna`` run again).

A sampler with a fixed seed replays the same random numbers in every process: a continued
study (same storage and name) would try trial 0's parameters again, then trial 1's, ... and
waste its startup trials. :class:`ContinuedTPESampler` seeds Optuna's TPE sampler with the
configured seed plus the number of the first trial it samples (the trials the study already
holds), so a fresh study is reproducible from the seed and every continuation draws new points
(and is itself reproducible, given the study). The sampler learns that number from the study
Optuna hands it, so it needs neither the storage nor the study name.

A continued study must also answer the same question: :func:`check_study_config` (called by the
sweeper ``hydra_plugins.melrecon_optuna.checked_optuna_sweeper.CheckedOptunaSweeper`` before
any trial) stores the sweep's fixed config — every key of the composed config but the swept
ones and those that do not change what a trial computes (:data:`NOT_COMPARED`) — in the study's
user attributes, and refuses a continuation whose fixed config differs, naming the keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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


#: Study user attribute holding the fixed config (``{dotted key: JSON value}``).
FIXED_CONFIG_ATTR = "melrecon_fixed_config"
#: Top-level config groups not compared: where a trial's files go and what it logs to.
NOT_COMPARED = ("hydra", "paths", "logger")


class StudyConfigError(ValueError):
    """A continuation of a stored Optuna study with another fixed config (one line)."""


def _flatten(node: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = json.dumps(node, sort_keys=True, default=str)


def swept_keys(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> set[str]:
    """Keys the sweep varies: ``hydra.sweeper.params`` and the command line's sweep overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {str(k) for k in (params or {})}
    keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(list(arguments)) if o.is_sweep_override()}
    return keys


def fixed_config(cfg: Any, swept: Iterable[str]) -> dict[str, str]:
    """``{dotted key: JSON value}`` of the composed config (interpolations as written, so that
    ``${now:...}`` and output folders compare equal) without the swept keys and :data:`NOT_COMPARED`."""
    from omegaconf import OmegaConf

    flat: dict[str, str] = {}
    _flatten(OmegaConf.to_container(cfg, resolve=False), "", flat)
    swept = tuple(swept)
    return {k: v for k, v in flat.items()
            if k.split(".")[0] not in NOT_COMPARED and not any(k == s or k.startswith(s + ".") for s in swept)}


def check_study_config(cfg: Any, arguments: Sequence[str], params: Mapping[str, Any] | None, storage: Any,
                       study_name: str | None, directions: Sequence[str]) -> None:
    """Record the sweep's fixed config in the study (a new study, or one made before the record)
    or raise :class:`StudyConfigError` naming the keys whose values differ from the recorded ones.
    Without a storage (in-memory study) there is nothing to continue, nothing to check."""
    if storage is None:
        return
    fixed = fixed_config(cfg, swept_keys(params, arguments))
    study = optuna.create_study(study_name=study_name, storage=storage, directions=list(directions),
                                load_if_exists=True)
    stored = study.user_attrs.get(FIXED_CONFIG_ATTR)
    if stored is None:
        study.set_user_attr(FIXED_CONFIG_ATTR, fixed)
        return
    diffs = sorted(k for k in set(stored) | set(fixed) if stored.get(k) != fixed.get(k))
    if diffs:
        shown = ", ".join(f"{k} ({stored.get(k, 'unset')} -> {fixed.get(k, 'unset')})" for k in diffs[:6])
        more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise StudyConfigError(
            f"Optuna study {study.study_name!r} in {storage} holds {len(study.trials)} trial(s) made with another "
            f"fixed (not swept) config: {shown}{more}; its trials would not be comparable: continue it with the "
            "same config, or start a new study (hydra.sweeper.study_name=...)")


__all__ = ["ContinuedTPESampler", "check_study_config", "fixed_config", "swept_keys", "StudyConfigError",
           "FIXED_CONFIG_ATTR"]
