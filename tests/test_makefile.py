"""``make install``: says what it installs, and reinstalls torch when TORCH or TORCH_INDEX changes.

Runs the real Makefile against a stand-in venv whose ``pip`` and ``python`` record their calls.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def _fake_venv(venv: Path, calls: Path) -> None:
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "pip $*" >> {calls}\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "python $*" >> {calls}\necho "torch 2.13.0+cpu"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def _make(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), "install", f"VENV={venv}", *args], capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def _torch_installs(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return [ln for ln in lines if ln.startswith("pip install") and "torch" in ln]


def test_install_reinstalls_torch_when_its_spec_changes(tmp_path):
    venv, calls = tmp_path / "venv", tmp_path / "calls.txt"
    _fake_venv(venv, calls)
    first = _make(venv)
    assert first.returncode == 0, first.stderr
    assert "make: installing torch 'torch==2.13.0' from pip's default index" in first.stdout
    assert _torch_installs(calls) == ["pip install --force-reinstall --no-deps torch==2.13.0",
                                      "pip install torch==2.13.0"]
    again = _make(venv)
    assert again.returncode == 0 and _torch_installs(calls) == []  # nothing changed, nothing installed
    cuda = _make(venv, "TORCH_INDEX=https://download.pytorch.org/whl/cu126")
    assert "from https://download.pytorch.org/whl/cu126" in cuda.stdout
    assert _torch_installs(calls)[0] == ("pip install --force-reinstall --no-deps torch==2.13.0 "
                                         "--index-url https://download.pytorch.org/whl/cu126")
    newest = _make(venv, "TORCH=torch", "TORCH_INDEX=https://download.pytorch.org/whl/cu126")
    assert _torch_installs(calls)[0].startswith("pip install --force-reinstall --no-deps torch --index-url")
    assert "pip install -e .[dev]" in newest.stdout or (venv / ".installed").is_file()
