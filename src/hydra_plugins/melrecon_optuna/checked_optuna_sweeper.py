"""``hydra.sweeper._target_: hydra_plugins.melrecon_optuna.checked_optuna_sweeper.CheckedOptunaSweeper``.

Hydra's Optuna sweeper, which before any trial stores the sweep's fixed (not swept) config in
the study's user attributes, and refuses, in one line naming the keys, to continue a stored
study with another fixed config (:func:`melrecon.lit.sweep.check_study_config`): trials of
another task (``data.accelerations=[2]`` next to R = 4 trials) would otherwise join the study
and its "best value". It lives in the ``hydra_plugins`` namespace because Hydra only
instantiates sweepers from there; melrecon is imported when the sweep starts, not at start-up.
"""

import sys
from typing import List

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class CheckedOptunaSweeper(OptunaSweeper):
    """:class:`OptunaSweeper` with the fixed-config check of a continued study."""

    def sweep(self, arguments: List[str]) -> None:
        from melrecon.lit.sweep import StudyConfigError, check_study_config

        impl = self.sweeper
        try:
            check_study_config(impl.config, arguments, impl.params, impl.storage, impl.study_name,
                               impl._get_directions())
        except StudyConfigError as err:
            print(f"melrecon: error: {err}", file=sys.stderr)
            sys.exit(2)
        return super().sweep(arguments)
