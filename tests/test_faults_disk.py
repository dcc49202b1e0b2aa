"""Faults of a full disk while melrecon writes: no partial file, one line naming the file.

The disk is made to fill at the write layer (the bytes of one output are half written, then
``OSError(ENOSPC)``), as a disk filling up mid-file would; one test uses a real, tiny tmpfs
(root only: it mounts one). Every output is written to a temporary name in its folder and
renamed, so a failure leaves nothing under a final name; one scan's outputs are kept all or
none; training stops with one ``melrecon: error:`` line naming the file.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, ROOT
from helpers import main_exit, one_error_line, train_tiny_run

def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temporaries included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _fill_disk_on(monkeypatch, suffix: str) -> list[str]:
    """Make the next write of a ``*suffix`` file by nibabel or Pillow write half its bytes, then
    fail with ENOSPC (a disk filling up mid-file); returns the names it failed on."""
    import nibabel as nib
    from PIL import Image

    failed: list[str] = []
    real_nib_save, real_pil_save = nib.save, Image.Image.save

    def half_then_enospc(data: bytes, target: str) -> None:
        Path(target).write_bytes(data[: len(data) // 2])
        failed.append(Path(target).name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def nib_save(img, filename, *args, **kwargs):
        if not str(filename).endswith(suffix):
            return real_nib_save(img, filename, *args, **kwargs)
        scratch = Path(filename).with_name("scratch-" + Path(filename).name.lstrip("."))
        real_nib_save(img, str(scratch), *args, **kwargs)
        data = scratch.read_bytes()
        scratch.unlink()
        half_then_enospc(data, str(filename))

    def pil_save(self, fp, format=None, **params):
        if not str(fp).endswith(suffix):
            return real_pil_save(self, fp, format, **params)
        buf = io.BytesIO()
        real_pil_save(self, buf, format or Path(str(fp)).suffix.lstrip(".").upper(), **params)
        half_then_enospc(buf.getvalue(), str(fp))

    monkeypatch.setattr(nib, "save", nib_save)
    monkeypatch.setattr(Image.Image, "save", pil_save)
    return failed


@pytest.fixture(scope="module")
def cine_run(tmp_path_factory, data_dir) -> Path:
    """A finished one-epoch tiny cine run (what reconstruct reads)."""
    return train_tiny_run(tmp_path_factory.mktemp("disk") / "run", CONF, data_dir, "logger=none")


@pytest.fixture
def cine_file(data_dir, cine_run) -> Path:
    return data_dir / "synthetic_cine" / "test" / "cine_test_0000.h5"


# ---------------------------------------------------------------------- reconstruct's outputs
@pytest.mark.parametrize("suffix", [".nii.gz", "_frames.png", ".gif", "_comparison.png"])
def test_reconstruct_full_disk_at_any_output_leaves_no_partial_file(cine_run, cine_file, tmp_path, monkeypatch,
                                                                     capsys, suffix):
    """--format h5,nifti,png with the disk full at one of the outputs: one FAILED line naming that
    output file, and none of the scan's files left (no 0-byte NIfTI or truncated GIF beside a
    kept .h5, no temporary file)."""
    from melrecon.reconstruct.cli import main

    failed = _fill_disk_on(monkeypatch, suffix)
    out = tmp_path / "out"
    code = main([str(cine_run), str(cine_file), "--out", str(out), "--format", "h5,nifti,png"])
    err = capsys.readouterr().err
    assert code == 1 and len(failed) == 1, err
    stem = cine_file.stem
    lines = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(lines) == 1 and f"cannot write {out / (stem + suffix)}: No space left on device" in lines[0], err
    assert "Traceback" not in err
    assert _files(out) == [], _files(out)


def test_validation_image_full_disk_is_one_line_and_leaves_no_partial_gif(compose_cfg, monkeypatch, capsys):
    """The disk fills while a validation GIF is written into images/: training stops with one
    line naming the GIF, and images/ holds no truncated GIF (nor a temporary file)."""
    failed = _fill_disk_on(monkeypatch, ".gif")
    cfg = compose_cfg("debug=tiny", "logger=none")  # cine: a PNG strip and a GIF per item
    code, err = main_exit(cfg, capsys)
    images = Path(cfg.paths.output_dir) / "images"
    assert code == 2 and failed, err[-3000:]
    one_error_line(err, f"cannot write {images / re.sub(r'^[.]tmp[0-9]+-', '', failed[0])}: No space left on device")
    assert not [n for n in _files(images) if n.endswith(".gif") or ".tmp" in n], _files(images)


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_full_disk_is_one_line_naming_it(compose_cfg, monkeypatch, capsys):
    """The disk fills while epoch 1's checkpoint is written: one line naming that checkpoint and
    saying the earlier ones are intact (they are), no traceback."""
    real_save = torch.save

    def filling_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    cfg = compose_cfg("debug=tiny", "logger=none", "trainer.max_epochs=2")
    monkeypatch.setattr(torch, "save", filling_save)
    code, err = main_exit(cfg, capsys)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    assert code == 2
    line = one_error_line(err, f"cannot write {ckpt_dir / 'epoch_001.ckpt'}: No space left on device")
    assert "the checkpoints written before are intact" in line
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------------- result .h5
def test_result_h5_is_refused_before_writing_when_the_disk_lacks_its_size(cine_run, cine_file, tmp_path,
                                                                          monkeypatch, capsys):
    """8 KB free: the result file is not started (HDF5 on a full disk ends in a segmentation
    fault); one FAILED line names it with its size and the free space; nothing is left."""
    import melrecon.atomic as atomic

    real_usage = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=8192))
    from melrecon.reconstruct.cli import main

    out = tmp_path / "out"
    out.mkdir()
    code = main([str(cine_run), str(cine_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("FAILED"))
    assert f"cannot write {out / (cine_file.stem + '.h5')}: No space left on device (needs about" in line, err
    assert "8 KiB free" in line and _files(out) == []


def test_result_h5_write_failure_midway_leaves_nothing(cine_run, cine_file, tmp_path, monkeypatch, capsys):
    """The free-space check passes but the disk fills while the result's bytes are written:
    one FAILED line naming the .h5, and no file left."""
    from melrecon.reconstruct.cli import main

    real_write = Path.write_bytes

    def filling(self, data):
        if self.name.endswith(cine_file.stem + ".h5") and self.name.startswith(".tmp"):
            real_write(self, bytes(memoryview(data)[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", filling)
    out = tmp_path / "out"
    code = main([str(cine_run), str(cine_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot write {out / (cine_file.stem + '.h5')}: No space left on device" in err, err
    assert _files(out) == []


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_reconstruct_on_a_really_full_tmpfs_exits_1_in_one_line(cine_run, cine_file, tmp_path, data_dir):
    """A real 256 KiB tmpfs with 12 KiB free: reconstruct --format h5,nifti,png exits 1 with one
    FAILED line naming the result file (it used to end in a segmentation fault, exit 139) and
    leaves nothing in --out."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 12 * 1024))
        out = disk / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
               "MELRECON_DATA_DIR": str(data_dir)}
        res = subprocess.run([sys.executable, "-m", "melrecon.reconstruct", str(cine_run), str(cine_file),
                              "--out", str(out), "--format", "h5,nifti,png"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
        failed = [ln for ln in res.stderr.splitlines() if ln.startswith("FAILED")]
        assert len(failed) == 1 and f"cannot write {out / (cine_file.stem + '.h5')}: No space left" in failed[0]
        assert "Traceback" not in res.stderr and _files(out) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_export_writers_leave_no_partial_file(tmp_path, monkeypatch):
    """export_image on a full disk: WriteError naming the file; the formats written before it
    are removed (all or none); no temporary file."""
    from melrecon.atomic import WriteError
    from melrecon.export import export_image

    _fill_disk_on(monkeypatch, "_xt.png")
    image = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'a_xt.png'}: No space left on device"):
        export_image(tmp_path, "a", image, "cine", ("nifti", "png"))
    assert _files(tmp_path) == []
