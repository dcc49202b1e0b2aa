"""Faults in what melrecon reads: a file in two splits of a dataset; Siemens twix files whose
header, MDH counters and data disagree about the k-space centre."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from melrecon.data import check, synthetic
from melrecon.data.datamodule import KspaceDataModule
from melrecon.data.h5 import LayoutError

CINE = dict(accelerations=[4.0], eval_acceleration=4.0, calib=4)


@pytest.fixture(scope="module")
def tiny_cine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "cine"
    synthetic.generate_dataset(root, "cine", "tiny", progress=False)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(check.CACHE_NAME))
    return dst


# ---------------------------------------------------------------------- a file in two splits
def test_synthetic_folder_with_an_extra_file_is_refused(tiny_cine, tmp_path):
    """A test file copied into train/ used to be trained on (num_train said 2, 3 files used)."""
    root = _copy(tiny_cine, tmp_path / "cine")
    shutil.copy(root / "test" / "cine_test_0000.h5", root / "train" / "extra.h5")
    dm = KspaceDataModule("cine", root, synthetic={"preset": "tiny", "progress": False}, **CINE)
    with pytest.raises(ValueError, match=r"train holds 1 file\(s\) that synthetic.json does not list \(train/extra\.h5\)"):
        dm.prepare_data()


@pytest.mark.parametrize("how", ["copy", "split_file"])
def test_a_file_whose_content_is_in_two_splits_is_refused(tiny_cine, tmp_path, how):
    """Any dataset (no synthetic marker): the same content in train and test is an error naming both."""
    root = _copy(tiny_cine, tmp_path / "cine")
    (root / "synthetic.json").unlink()
    kwargs = dict(CINE)
    if how == "copy":
        shutil.copy(root / "test" / "cine_test_0000.h5", root / "train" / "renamed.h5")
    else:  # split files listing the same file twice
        (root / "train.txt").write_text("train/cine_train_0000.h5\ntest/cine_test_0000.h5\n")
        kwargs["train_split"] = "train.txt"
    dm = KspaceDataModule("cine", root, synthetic=None, **kwargs)
    with pytest.raises(LayoutError, match=r"also in the (test|train) split") as err:
        dm.setup("fit")
    assert "cine_test_0000.h5" in str(err.value) or "renamed.h5" in str(err.value)


def test_content_hashes_are_cached_by_size_and_mtime(tiny_cine, tmp_path, monkeypatch):
    root = _copy(tiny_cine, tmp_path / "cine")
    hashed = []
    real = check._content_hash
    monkeypatch.setattr(check, "_content_hash", lambda p: hashed.append(Path(p).name) or real(p))
    check.clear_memory_cache()
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert len(hashed) == 4  # every file of every split, once
    check.clear_memory_cache()  # a new process: the JSON cache answers
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert len(hashed) == 4
    f = root / "val" / "cine_val_0000.h5"
    f.write_bytes(f.read_bytes())  # rewritten (new mtime): hashed again
    KspaceDataModule("cine", root, synthetic=None, **CINE).setup("fit")
    assert hashed[4:] == ["cine_val_0000.h5"]
