"""Check that a folder of wheels, together with what the GPU machine already has, is complete.

Every wheel's ``Requires-Dist`` lines (extras skipped, environment markers evaluated) must be met
by another wheel of the folder or by a package that is already installed::

    python depcheck.py WHEELS --preinstalled preinstalled.txt   # prepare.sh: names only, for
                                                                # the target Python (3.12 Linux)
    python depcheck.py WHEELS --installed                       # run.sh, on the machine itself:
                                                                # versions of this interpreter

With ``--preinstalled`` the markers are evaluated for ``--python`` (the GPU machine's Python, not
the one running this) and a requirement met by a preinstalled name is accepted without a version
check (the versions are only known there); ``--installed`` checks those versions too, through
``importlib.metadata`` of the running interpreter (run it with the carried wheels on PYTHONPATH).
Prints one line per problem and exits 1 if there is any; a wheel that duplicates a preinstalled
package is reported as a warning (it shadows the machine's copy for the whole run).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    """(canonical name, version, requirements) from a wheel's ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(names) != 1:
            raise ValueError(f"{path.name}: expected one top-level *.dist-info/METADATA, found {names}")
        meta = Parser().parsestr(zf.read(names[0]).decode("utf-8"))
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return canonicalize_name(meta["Name"]), Version(meta["Version"]), reqs


def target_environment(python: str) -> dict[str, str]:
    """Marker environment of CPython ``python`` (e.g. "3.12.3") on Linux x86-64, no extra."""
    env = dict(default_environment())
    major_minor = ".".join(python.split(".")[:2])
    env.update(python_version=major_minor, python_full_version=python, implementation_name="cpython",
               platform_python_implementation="CPython", implementation_version=python,
               sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine="x86_64",
               extra="")
    return env


def read_names(path: Path) -> set[str]:
    """Canonical package names from a file with one name a line (``#`` comments allowed)."""
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(canonicalize_name(line))
    return out


def installed_version(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def check(wheels_dir: Path, env: dict[str, str], preinstalled: set[str] | None) -> tuple[list[str], list[str]]:
    """Problems and warnings for the wheels of ``wheels_dir``.

    ``preinstalled`` None: requirements not met by a wheel are looked up (with versions) in the
    running interpreter; otherwise they must be in this set of names (versions not checked).
    """
    files = sorted(wheels_dir.glob("*.whl"))
    if not files:
        return [f"{wheels_dir}: no .whl files"], []
    wheels: dict[str, tuple[Version, list[Requirement], str]] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for f in files:
        name, version, reqs = wheel_metadata(f)
        if name in wheels:  # two versions of one package stop pip's whole install
            problems.append(f"{f.name}: a second wheel of {name} (also {wheels[name][2]})")
        wheels[name] = (version, reqs, f.name)
        if preinstalled is not None and name in preinstalled:
            warnings.append(f"{f.name}: {name} is preinstalled there; the wheel shadows that copy")
    for name, (_version, reqs, fname) in sorted(wheels.items()):
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform / Python
            dep = canonicalize_name(req.name)
            if dep in wheels:
                have: Version | None = wheels[dep][0]
                where = "wheel"
            elif preinstalled is not None:
                if dep not in preinstalled:
                    problems.append(f"{fname}: needs {req}, which is neither a wheel here nor preinstalled")
                continue
            else:
                have, where = installed_version(dep), "installed"
                if have is None:
                    problems.append(f"{fname}: needs {req}, which is neither a wheel here nor installed")
                    continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{fname}: needs {req}, but the {where} version is {have}")
    return problems, warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheels", type=Path, help="folder of .whl files")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--preinstalled", type=Path, help="file of package names already on the target machine")
    how.add_argument("--installed", action="store_true", help="check against this interpreter's packages")
    ap.add_argument("--python", default="3.12.3", help="target Python for the markers (with --preinstalled)")
    args = ap.parse_args(argv)
    if args.preinstalled is not None:
        env, pre = target_environment(args.python), read_names(args.preinstalled)
    else:
        env, pre = dict(default_environment(), extra=""), None
    problems, warnings = check(args.wheels, env, pre)
    for w in warnings:
        print(f"depcheck: warning: {w}")
    for p in problems:
        print(f"depcheck: {p}")
    n = len(list(args.wheels.glob("*.whl")))
    print(f"depcheck: {n} wheels, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
