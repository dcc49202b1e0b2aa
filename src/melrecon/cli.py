"""``melrecon``: one command for the tools (console script of the package; also
``python -m melrecon``).

Usage::

    melrecon {reconstruct,evaluate,convert,validate,synthetic,brain3d,study} [ARGS ...]
    melrecon SUBCOMMAND --help

Each subcommand hands its arguments unchanged to the ``main(argv)`` of the tool's module, so
``melrecon validate data/`` and ``python -m melrecon.data.validate data/`` are the same run with
the same exit status. ``melrecon SUBCOMMAND --help`` prints the tool's own options with their
defaults and one example; ``melrecon --help`` lists the subcommands. Training stays
``python train.py`` (Hydra owns its command line).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROG = "melrecon"


@dataclass(frozen=True)
class Tool:
    """A subcommand: the module whose ``main(argv) -> int`` runs it, the name of the module's
    function that builds its ``argparse`` parser (for help), a summary and an example."""

    module: str
    parser: str
    summary: str
    example: str


TOOLS: dict[str, Tool] = {
    "reconstruct": Tool(
        "melrecon.reconstruct.cli", "build_parser", "reconstruct scans with a trained network",
        "melrecon reconstruct logs/train/runs/2025-01-01_12-00-00 data/knee3d/test --out recon/modl"),
    "evaluate": Tool(
        "melrecon.evaluate", "build_parser", "score reconstructions against targets, compare methods",
        "melrecon evaluate --target data/knee3d/test --predictions recon/modl recon/cs --zero-filled"),
    "convert": Tool(
        "melrecon.data.convert.__main__", "build_parser", "convert raw data (mridata, fastMRI, OCMR, CMRxRecon, twix) or NIfTI magnitude volumes",
        "melrecon convert twix raw/meas_MID00042_gre3d.dat data/knee3d/all/gre3d.h5"),
    "validate": Tool(
        "melrecon.data.validate", "build_parser", "check files against the melrecon HDF5 layout",
        "melrecon validate data/knee3d"),
    "synthetic": Tool(
        "melrecon.data.synthetic", "build_parser", "generate a synthetic dataset (knee3d or cine)",
        "melrecon synthetic cine data/synthetic_cine --preset small"),
    "brain3d": Tool(
        "melrecon.data.brain3d", "build_parser", "build the brain study dataset from nilearn's MNI152 template",
        "melrecon brain3d data/brain3d"),
    "study": Tool(
        "melrecon.study.__main__", "build_parser", "run a study: the paper's comparisons (conf/study/)",
        "melrecon study knee3d_vs_2d preset=cpu"),
}

#: Subcommands whose first argument selects a tool with options of its own (for --help).
SUBTOOLS: dict[tuple[str, str], Tool] = {
    ("convert", "nifti"): Tool(
        "melrecon.data.convert.nifti", "build_parser", "magnitude volumes to simulated multi-coil k-space",
        "melrecon convert nifti T1.nii.gz data/brain --voxel-mm 2 --coils 8 --snr 30 --blocks 4 "
        "--split-pattern train,train,val,test"),
}


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Append ``(default: X)`` to option help unless the default is None/False or the help
    already states one; keeps the example's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text.lower()
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _overview() -> str:
    width = max(map(len, TOOLS))
    lines = [f"usage: {PROG} {{{','.join(TOOLS)}}} [ARGS ...]", "",
             "melrecon tools: each subcommand runs python -m <module> with the same arguments.", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {tool.summary}" for name, tool in TOOLS.items()]
    lines += ["", "examples:"] + [f"  {tool.example}" for tool in TOOLS.values()]
    lines += ["", f"'{PROG} SUBCOMMAND --help' shows a subcommand's options and defaults; "
              "training: python train.py (Hydra)."]
    return "\n".join(lines) + "\n"


def tool_help(name: str, tool: Tool | None = None, prog: str | None = None) -> str:
    """The help of one subcommand: its module's parser, as ``melrecon NAME``, with defaults and
    the example (``tool``, ``prog``: a sub-tool's, see :data:`SUBTOOLS`)."""
    tool = tool or TOOLS[name]
    module = importlib.import_module(tool.module)
    build: Callable[[], argparse.ArgumentParser] | None = getattr(module, tool.parser, None)
    if build is None:  # the module no longer offers its parser: fall back to its own --help text
        raise LookupError(f"{tool.module}.{tool.parser} not found")
    parser = build()
    parser.prog = f"{PROG} {prog or name}"
    parser.formatter_class = _DefaultsFormatter
    parser.epilog = f"example:\n  {tool.example}"
    return parser.format_help()


def _wants_help(args: Sequence[str]) -> bool:
    for arg in args:
        if arg == "--":  # what follows is a value, never an option
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``melrecon SUBCOMMAND ARGS``; returns the tool's exit status (0 for help, 2 for an
    unknown subcommand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_overview(), end="")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in TOOLS:
        print(f"{PROG}: error: unknown subcommand {name!r}; choose from {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    if _wants_help(rest) and (name, rest[0]) in SUBTOOLS:  # e.g. convert nifti: options of its own
        sub = SUBTOOLS[(name, rest[0])]
        print(tool_help(name, Tool(sub.module, sub.parser, sub.summary, sub.example), f"{name} {rest[0]}"), end="")
        return 0
    if _wants_help(rest):
        try:
            print(tool_help(name), end="")
        except LookupError:
            print(f"example:\n  {TOOLS[name].example}\n")
            try:
                importlib.import_module(TOOLS[name].module).main(["--help"])
            except SystemExit as done:  # argparse exits after printing its help
                return done.code or 0
        return 0
    return importlib.import_module(TOOLS[name].module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
