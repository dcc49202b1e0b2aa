"""Every config group option composes and instantiates; paths, launchers and sweeps are valid."""

from pathlib import Path

import hydra
import pytest
import yaml
from melrecon.lit.app import instantiate_trainer
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "base")  # base: shared fields
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


def test_required_options_exist():
    for group, names in {
        "experiment": ["cine_unroll20", "cine_unroll5", "knee3d_slab", "knee2d_slice"],
        "data": ["synthetic_knee3d", "synthetic_cine", "knee3d", "cine", "fastmri2d"],
        "model": ["modl3d_slab", "modl2d_slice", "modl_cine"],
        "trainer": ["cpu", "gpu", "ddp"],
        "logger": ["wandb", "csv", "tensorboard"],
        "hparams_search": ["cine_optuna"],
        "debug": ["cpu", "smoke", "tiny"],
    }.items():
        for n in names:
            assert (CONF / group / f"{n}.yaml").is_file(), f"conf/{group}/{n}.yaml missing"


def test_experiment_is_not_in_defaults_list():
    defaults = yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]
    assert not any(isinstance(d, dict) and "experiment" in d for d in defaults)


def test_default_config_composes_and_resolves(compose_cfg, data_dir):
    cfg = compose_cfg()
    assert cfg.optimized_metric == "val/ssim_best"
    assert cfg.callbacks.model_checkpoint.monitor == "val/ssim"
    assert Path(cfg.data.root).parent == data_dir  # MELRECON_DATA_DIR moves the data
    OmegaConf.resolve(cfg)  # every interpolation resolves


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(compose_cfg, name):
    cfg = compose_cfg(f"+experiment={name}")
    assert cfg.task_name == name
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net=net)
    assert module.net is net
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.root == Path(cfg.data.root)


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a YAML mapping."""
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_holds_only_deltas(compose_cfg, name):
    """Every value an experiment file sets differs from what its group choices give without it."""
    body = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    choices = []  # the experiment's group selections as command-line overrides
    for entry in body.pop("defaults"):
        ((key, option),) = entry.items()
        group = key.removeprefix("override /")
        choices.append(f"~{group}" if option is None else f"{group}={option}")  # ~group: `group: null`
    assert "~debug" in choices, f"{name} must select debug: null (paper sizes)"
    inherited = compose_cfg(*choices)
    for key, value in _leaves(body):
        assert OmegaConf.select(inherited, key, default="__missing__") != value, \
            f"conf/experiment/{name}.yaml: {key}: {value} is what it inherits"


def test_default_run_is_cpu_sized_and_experiments_paper_sized(compose_cfg):
    """The default run selects debug=cpu (README: 16 channels, 3 convs, 10 epochs); every
    experiment the paper's 64 channels and 5 convs for 30 epochs."""
    cfg = compose_cfg()
    assert (cfg.model.regularizer.width, cfg.model.regularizer.depth, cfg.trainer.max_epochs) == (16, 3, 10)
    for name in EXPERIMENTS:
        cfg = compose_cfg(f"+experiment={name}")
        assert (cfg.model.regularizer.width, cfg.model.regularizer.depth, cfg.trainer.max_epochs) == (64, 5, 30), name
        # a debug option on the command line replaces the experiment's debug: null
        cfg = compose_cfg(f"+experiment={name}", "debug=cpu")
        assert (cfg.model.regularizer.width, cfg.model.regularizer.depth, cfg.trainer.max_epochs) == (16, 3, 10), name


@pytest.mark.parametrize("name", DEBUG)
def test_debug_options_compose_and_instantiate(compose_cfg, name):
    cfg = compose_cfg(f"debug={name}")
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net=net)
    assert module.net is net
    hydra.utils.instantiate(cfg.data)
    instantiate_trainer(cfg.trainer, logger=False)
    if name in ("smoke", "tiny"):
        assert cfg.data.synthetic.preset == "tiny" and cfg.trainer.max_epochs == 1
    if name == "tiny":  # smoke's data and trainer, cpu's depth, 2 unrolls of width 4
        assert (cfg.model.num_unrolls, cfg.model.regularizer.width, cfg.model.regularizer.depth) == (2, 4, 3)


@pytest.mark.parametrize("name", DATA)
def test_data_options_instantiate(compose_cfg, name):
    cfg = compose_cfg(f"data={name}")
    hydra.utils.instantiate(cfg.data)


@pytest.mark.parametrize("name", DATA)
def test_data_options_set_only_what_base_lacks(name):
    """Each data option starts from data/base.yaml and sets only values that differ from it."""
    option = yaml.safe_load((CONF / "data" / f"{name}.yaml").read_text())
    assert option.pop("defaults") == ["base", "_self_"], f"conf/data/{name}.yaml must start from base"
    base = OmegaConf.load(CONF / "data" / "base.yaml")
    for key, value in _leaves(option):
        if OmegaConf.is_missing(base, key.split(".")[0]):
            continue  # a field base leaves to the dataset
        assert OmegaConf.select(base, key, default="__missing__") != value, f"conf/data/{name}.yaml: {key} repeats base"


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainer_options(compose_cfg, trainer):
    cfg = compose_cfg(f"trainer={trainer}")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if trainer == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.use_distributed_sampler is False
    if trainer == "cpu":
        from melrecon.lit.app import instantiate_trainer  # strips the planner's settings (not Trainer arguments)

        tr = instantiate_trainer(cfg.trainer, logger=False, enable_progress_bar=False)
        assert tr.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "wandb_csv", "none"])
def test_logger_options(compose_cfg, logger, monkeypatch):
    from melrecon.lit.app import instantiate_loggers

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(f"logger={logger}")
    loggers = instantiate_loggers(cfg.logger)
    assert len(loggers) == {"wandb": 1, "csv": 1, "tensorboard": 1, "wandb_csv": 2, "none": 0}[logger]


def test_wandb_mode_follows_env(compose_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert compose_cfg().logger.wandb.mode == "offline"  # offline unless asked
    monkeypatch.setenv("WANDB_MODE", "online")
    assert compose_cfg().logger.wandb.mode == "online"


def test_slurm_launcher_config(monkeypatch):
    monkeypatch.setenv("MELRECON_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0


def _sweep_keys_exist(cfg, keys):
    for key in keys:
        assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", f"{key} not in the config"


def test_optuna_search_space_names_real_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("MELRECON_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=cine_optuna", "+experiment=cine_unroll20",
                                                      f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.storage == f"sqlite:///{tmp_path}/optuna/cine_optuna.db" and sweeper.study_name == "cine_optuna"
    assert (tmp_path / "optuna").is_dir()  # ${mkdir:} made the folder sqlite needs
    params = dict(sweeper.params)
    assert {"module.optimizer.lr", "model.regularizer.width", "model.dc.lam_init"} <= set(params)
    _sweep_keys_exist(cfg, params)


def test_wandb_sweep_file(compose_cfg):
    spec = yaml.safe_load((CONF / "sweeps" / "cine_wandb.yaml").read_text())
    assert "${args_no_hyphens}" in spec["command"]
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    extra = [c for c in spec["command"] if not c.startswith("${")]
    # what the agent would run: the fixed overrides plus one sampled value per parameter
    sample = []
    for key, p in spec["parameters"].items():
        v = p["values"][0] if "values" in p else p["min"]
        sample.append(f"{key}={v}")
    cfg = compose_cfg(*extra, *sample)
    _sweep_keys_exist(cfg, spec["parameters"])
    assert spec["metric"]["name"] == cfg.optimized_metric
