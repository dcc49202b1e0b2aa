"""KspaceDataModule: first-run synthetic generation, batches, errors, DDP samplers, configs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

import melrecon.data.synthetic as synthetic
from melrecon.data.batch import ReconBatch
from melrecon.data.datamodule import KspaceDataModule
from melrecon.data.samplers import VolumeSampler

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
KNEE = dict(slab_size=4, accelerations=[3.0], calib=4, mask_pool=4)
CINE = dict(accelerations=[3.0, 4.0], calib=2)


@pytest.mark.parametrize("kind", ["volume3d", "cine"])
def test_empty_folder_generates_once_and_serves_batches(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "new_user" / "data"
    opts = KNEE if kind == "volume3d" else CINE
    dm = KspaceDataModule(kind, root, batch_size=2, synthetic={"preset": "tiny", "seed": 1, "progress": False}, **opts)
    dm.prepare_data()
    files = sorted(root.rglob("*.h5"))
    assert [p.parent.name for p in files].count("train") == 2
    stamp = {p: p.stat().st_mtime_ns for p in files}
    KspaceDataModule(kind, root, synthetic={"preset": "tiny", "seed": 1}, **opts).prepare_data()  # 2nd run: no-op
    assert {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*.h5"))} == stamp
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if kind == "volume3d":
        assert batch.kspace.shape == (2, 4, 4, 16, 16) and batch.maps.shape == (2, 4, 4, 16, 16)
        assert batch.mask.shape == (2, 1, 1, 16, 16) and batch.target.shape == (2, 4, 16, 16)
    else:
        assert batch.kspace.shape == (2, 4, 4, 16, 16) and batch.maps.shape == (2, 4, 1, 16, 16)
        assert batch.mask.shape == (2, 1, 4, 1, 16) and batch.target.shape == (2, 4, 16, 16)
    assert batch.x0.shape == batch.target.shape and batch.x0.dtype == torch.complex64
    assert batch.max.shape == (2,) and batch.position.dtype == torch.long and len(batch.file) == 2
    # a typed batch that Lightning moves to the device field by field (meta: no GPU needed)
    assert type(batch) is ReconBatch
    moved = pl.LightningModule().transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert type(moved) is ReconBatch and moved.file == batch.file
    assert all(getattr(moved, f).device.type == "meta" for f in ReconBatch._fields if f != "file")
    val = list(dm.val_dataloader())
    assert all(b.kspace.shape[0] == 1 for b in val)
    dm.setup("test")
    assert len(list(dm.test_dataloader())) >= 1


def test_missing_data_without_generation_names_the_folder(tmp_path: Path) -> None:
    dm = KspaceDataModule("volume3d", tmp_path / "knee_real", synthetic=None)
    with pytest.raises(ValueError, match=str(tmp_path / "knee_real")):
        dm.prepare_data()
    with pytest.raises(ValueError, match="train folder .*does not exist"):
        dm.setup("fit")


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    real = synthetic.write_scan

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the dataset
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_scan", failing)
    root = tmp_path / "cine"
    with pytest.raises(KeyboardInterrupt):
        KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE).prepare_data()
    assert not root.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "write_scan", real)
    KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE).prepare_data()
    assert len(list(root.rglob("*.h5"))) == 4


def test_split_files(tmp_path: Path) -> None:
    root = tmp_path / "d"
    synthetic.generate_dataset(root, "cine", "tiny", progress=False)
    (root / "mine.txt").write_text("# my split\ntrain/cine_train_0001.h5\n")
    dm = KspaceDataModule("cine", root, train_split="mine.txt", synthetic=None, **CINE)
    assert dm.split_files("train") == [root / "train" / "cine_train_0001.h5"]
    (root / "bad.txt").write_text("train/nope.h5\n")
    with pytest.raises(ValueError, match="nope.h5"):
        KspaceDataModule("cine", root, train_split="bad.txt", synthetic=None).split_files("train")


def test_distributed_samplers(tmp_path: Path) -> None:
    root = tmp_path / "k"
    synthetic.generate_dataset(root, "knee3d", "tiny", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        dm = KspaceDataModule("volume3d", root, synthetic=None, **KNEE)
        dm.setup("fit")
        assert isinstance(dm.train_dataloader().sampler, DistributedSampler)
        val = dm.val_dataloader()
        assert isinstance(val.sampler, VolumeSampler) and len(val.sampler) == len(dm.datasets["val"])
    finally:
        dist.destroy_process_group()
    assert not isinstance(KspaceDataModule("volume3d", root, synthetic=None, **KNEE).val_dataloader().sampler, VolumeSampler)


def _data_cfg(name: str, data_dir: Path):
    """``cfg.data`` of option ``name``, composed as train.py does (options build on
    conf/data/base.yaml through their defaults lists)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={name}", f"paths.data_dir={data_dir}"])
    OmegaConf.set_struct(cfg, False)
    return cfg.data


@pytest.mark.parametrize("name", ["synthetic_knee3d", "synthetic_cine", "knee3d", "cine", "fastmri2d"])
def test_configs_instantiate(tmp_path: Path, name: str) -> None:
    from hydra.utils import instantiate

    dm = instantiate(_data_cfg(name, tmp_path))
    assert isinstance(dm, KspaceDataModule) and dm.root == tmp_path / name
    if name.startswith("synthetic"):
        assert dm.synthetic is not None and dm.synthetic["preset"] == "small"
    else:
        assert dm.synthetic is None
        with pytest.raises(ValueError, match="data.root"):
            dm.prepare_data()


def test_lightning_fit_generates_and_validates_every_tile_once(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[tuple[str, int, int]] = []

        def training_step(self, batch, batch_idx):
            return ((batch.x0.abs() * self.w - batch.target.abs()) ** 2).mean()

        def validation_step(self, batch, batch_idx):
            self.seen.append((batch.file[0], int(batch.position[0]), batch.target.shape[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = KspaceDataModule("volume3d", tmp_path / "fresh", batch_size=2, synthetic={"preset": "tiny", "progress": False},
                          slab_size=3, accelerations=[3.0], calib=4, mask_pool=4)
    probe = Probe()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=dm)
    assert probe.w.item() != 0.0  # trained on the generated data
    cover = [0] * 8  # the one tiny val volume has 8 readout positions, tiles 3+3+2
    for _, start, n in probe.seen:
        for p in range(start, start + n):
            cover[p] += 1
    assert cover == [1] * 8 and len({f for f, _, _ in probe.seen}) == 1


def _ddp_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dm = KspaceDataModule("volume3d", root, synthetic=None, slab_size=3, accelerations=[3.0], calib=4, mask_pool=4)
        dm.setup("fit")
        files = [(b.file[0], int(b.position[0])) for b in dm.val_dataloader()]
        train = list(iter(dm.train_dataloader().sampler))
        Path(out, f"rank{rank}.txt").write_text(repr((files, train)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s on 2 busy cores
def test_two_rank_ddp_keeps_volumes_together(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    root = tmp_path / "k"
    synthetic.generate_dataset(root, "knee3d", "tiny", progress=False, num_val=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(root), str(tmp_path)), nprocs=2, join=True)
    results = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    val = [set(f for f, _ in r[0]) for r in results]
    assert val[0] and val[1] and not (val[0] & val[1])  # each volume on exactly one rank
    assert len(val[0] | val[1]) == 3
    assert sum(len(r[0]) for r in results) == 3 * 3  # 3 volumes x 3 tiles, each once
    train = [set(r[1]) for r in results]
    assert not (train[0] & train[1]) and len(train[0] | train[1]) == 2 * 3  # DistributedSampler split


def test_reusing_a_folder_generated_with_other_settings_fails(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE).prepare_data()
    KspaceDataModule("cine", root, synthetic={"preset": "tiny", "seed": 0}, **CINE).prepare_data()  # same: fine
    with pytest.raises(ValueError, match=f"{root}.*'preset': 'tiny'.*'preset': 'small'"):
        KspaceDataModule("cine", root, synthetic={"preset": "small"}, **CINE).prepare_data()
    with pytest.raises(ValueError, match="delete the folder"):
        KspaceDataModule("cine", root, synthetic={"preset": "tiny", "num_train": 5}, **CINE).prepare_data()
    KspaceDataModule("cine", root, synthetic=None, **CINE).prepare_data()  # real-data mode: used as is


def test_hydra_synthetic_section_with_lists(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = _data_cfg("synthetic_cine", tmp_path)
    cfg.root = str(tmp_path / "c")
    cfg.calib = 2
    cfg.accelerations = [4]
    cfg.synthetic = {"preset": "tiny", "shape": [16, 12], "progress": False}
    dm = instantiate(cfg)
    dm.prepare_data()
    dm.prepare_data()  # the marker written from a Hydra list compares equal on reuse
    dm.setup("fit")
    assert dm.datasets["train"][0].target.shape == (4, 16, 12)
