"""The ``melrecon`` command (melrecon.cli), called in-process: it dispatches to each tool's own
``main`` with the same arguments and exit status, and its help shows defaults and examples."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S

from melrecon import cli
from melrecon.data import validate
from melrecon.data.h5 import find_files, write_scan

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_points_at_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["melrecon"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_overview_lists_every_subcommand_with_an_example(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, tool in cli.TOOLS.items():
        assert f"  {name}" in out and tool.example in out
        assert tool.example.startswith(f"melrecon {name} ")
    assert cli.main([]) == 2  # no subcommand: the overview, and a usage error status
    assert cli.main(["train"]) == 2
    assert "unknown subcommand 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("name,default", [
    ("reconstruct", "(default 1)"),  # stated in the tool's own help text, not repeated
    ("evaluate", "(default: evaluation)"),
    ("convert", "(default: 24)"),
    ("validate", None),
    ("synthetic", "(default: small)"),
    ("study", None),
    ("plan", None),
])
def test_subcommand_help_shows_defaults_and_example(capsys, name, default):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: melrecon {name} ")
    assert f"example:\n  {cli.TOOLS[name].example}" in out
    if default:
        assert default in " ".join(out.split())
    assert "(default: None)" not in out and "(default: False)" not in out


def _scan(path: Path) -> Path:
    """A physically consistent one-coil file: unit maps, target = S^H F^H k."""
    from melrecon.data.npfft import fftc_np

    t = np.ones((2, 8, 8), np.complex64)
    k = fftc_np(t, axes=(-2, -1)).astype(np.complex64)
    return write_scan(path, k[None], np.ones((1, 2, 8, 8), np.complex64), t, "volume3d", source="test")


def test_dispatch_runs_the_tool_with_the_same_arguments_and_status(tmp_path, capsys):
    good = _scan(tmp_path / "good.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    for argv, status in (([str(good)], 0), ([str(good), str(bad)], 1), (["--quick", str(good)], 0)):
        assert cli.main(["validate", *argv]) == status
        via_cli = capsys.readouterr()
        assert validate.main(argv) == status
        direct = capsys.readouterr()
        assert (via_cli.out, via_cli.err) == (direct.out, direct.err)
    with pytest.raises(SystemExit) as exc:  # argparse usage errors exit 2, as with python -m
        cli.main(["validate", "--no-such-flag"])
    assert exc.value.code == 2


def test_synthetic_convert_and_evaluate_through_cli(tmp_path):
    from twix_writer import Line, write_twix_file

    from melrecon.data.npfft import fftc_np

    assert cli.main(["synthetic", "cine", str(tmp_path / "cine"), "--preset", "tiny", "--num-train", "1",
                     "--num-val", "1", "--num-test", "0"]) == 0
    assert len(find_files(tmp_path / "cine")) == 2
    k = fftc_np(np.ones((2, 16, 8), np.complex64), axes=(1, 2))
    write_twix_file(tmp_path / "raw.dat", [Line(k[:, :, y], {"Lin": y}, center_lin=4) for y in range(8)],
                    {"sKSpace.lPhaseEncodingLines": 8})
    np.save(tmp_path / "maps.npy", np.full((2, 1, 8, 8), 1 / np.sqrt(2), np.complex64))
    assert cli.main(["convert", "twix", str(tmp_path / "raw.dat"), str(tmp_path / "t" / "raw.h5"),
                     "--maps", str(tmp_path / "maps.npy")]) == 0
    assert cli.main(["validate", str(tmp_path / "t")]) == 0
    # evaluate through the cli: a missing predictions folder is a usage error (2)
    assert cli.main(["evaluate", "--target", str(tmp_path / "t"), "--predictions", str(tmp_path / "none")]) == 2


def test_python_dash_m_melrecon():
    run = subprocess.run([sys.executable, "-m", "melrecon", "validate", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, timeout=HANG_GUARD_S)
    assert run.returncode == 0 and run.stdout.startswith("usage: melrecon validate")


@pytest.mark.parametrize("name", list(cli.TOOLS))
def test_every_argument_has_help(name):
    import argparse
    import importlib

    tool = cli.TOOLS[name]
    parser = getattr(importlib.import_module(tool.module), tool.parser)()
    bare = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert bare == [], f"melrecon {name}: arguments without help: {bare}"
