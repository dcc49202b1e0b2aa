"""``python train.py --help``: a description, the experiments and the groups a user picks."""

from __future__ import annotations

import subprocess
import sys

from conftest import CONF, HANG_GUARD_S, ROOT


def test_help_lists_experiments_and_user_groups_only(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=HANG_GUARD_S, env={"PATH": "", "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.startswith("melrecon train.py: train an unrolled MRI reconstruction network")
    for exp in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        assert f"\n  {exp} " in text, exp  # every experiment file, described
    groups = text.split("Groups you pick")[1].split("Common options")[0]
    listed = {ln.split()[0] for ln in groups.splitlines()
              if ln.startswith("  ") and not ln.startswith("   ")}
    assert listed == {"data", "model", "debug", "trainer", "logger", "module", "callbacks", "hparams_search",
                      "hydra/launcher"}
    for option in ("synthetic_cine", "knee3d", "modl_cine", "rev3d_slab", "gpu", "wandb_csv", "cine_optuna"):
        assert option in text
    # not for training: study trees, W&B sweep files, the shared data base and the family files
    for hidden in ("study", "sweeps", "base", "modl,", "rev,"):
        assert hidden not in groups, hidden
    assert "== Config ==" not in text and "Powered by Hydra" not in text  # Hydra's generic page
