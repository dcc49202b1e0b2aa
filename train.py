"""Train an unrolled MRI reconstruction network.

    python train.py                              # default: small synthetic cine problem, CPU (debug=cpu)
    python train.py debug=tiny                   # the whole stack in seconds (conf/debug/)
    python train.py +experiment=cine_unroll20    # an experiment from conf/experiment/ (paper sizes)
    python train.py +experiment=cine_unroll20 debug=cpu                      # ... at CPU sizes
    python train.py -m +experiment=cine_unroll20 model.num_unrolls=5,10,20   # multirun
    python train.py +experiment=cine_unroll20 hparams_search=cine_optuna     # Optuna sweep

See README.md and conf/train.yaml.
"""

import os
import sys
from pathlib import Path

# conf/paths/default.yaml reads the project root from here (tests set it themselves)
os.environ.setdefault("MELRECON_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from melrecon.config_schema import check_overrides  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"
if __name__ == "__main__":
    # a wrong option is one line and exit status 2 before Hydra makes a run folder or anything is built
    check_overrides(CONF, "train", sys.argv[1:])

from melrecon.lit import app  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return app.main(cfg)


if __name__ == "__main__":
    main()
