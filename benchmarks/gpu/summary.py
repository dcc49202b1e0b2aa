"""Merge the kit's step outputs into ``results.csv`` and a Markdown ``summary.md``.

    python benchmarks/gpu/summary.py OUT_DIR [--steps STEPS.csv]

Reads ``OUT_DIR/env.json`` (env_info.py), ``tests.xml`` (pytest's JUnit XML), ``bench.csv``
(bench.py), ``train.csv`` (train_runs.py), ``plan.csv`` (plan_step.py) and the step table run.sh keeps (``--steps``); a
missing input (a step that failed or was cut) is reported in the summary, never an error.

``results.csv``: one row per step, test, benchmark case and training run; columns ``step``
(kit | tests | bench | train | plan), ``case``, ``status``, then every other field of those rows.
``summary.md``: the environment, then one table per step, with the benchmark also pivoted to
peak memory / step time per (family, kind, N) and mode, the table to record in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KIT = Path(__file__).resolve().parent
if str(KIT) not in sys.path:
    sys.path.insert(0, str(KIT))

from rows import RowWriter, number, read_rows  # noqa: E402

MODES = ("standard", "checkpoint", "mel")


# ------------------------------------------------------------------------------ inputs
def read_tests(path: Path) -> list[dict[str, Any]]:
    """One row per test case of a JUnit XML file: case (file::name), status, wall_s, note."""
    if not path.is_file():
        return []
    rows = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        status, note = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                status = {"failure": "failed"}.get(tag, tag)
                note = " ".join((el.get("message") or el.text or "").split())[:200]
                break
        module = (tc.get("classname") or "").replace(".", "/")
        rows.append({"step": "tests", "case": f"{module}.py::{tc.get('name')}", "status": status,
                     "wall_s": tc.get("time"), "note": note})
    return rows


def merged_rows(out: Path, steps: Path | None) -> list[dict[str, Any]]:
    """All rows of results.csv, in step order."""
    rows: list[dict[str, Any]] = []
    for r in read_rows(steps) if steps else []:
        rows.append({"step": "kit", "case": r.get("step"), **{k: v for k, v in r.items() if k != "step"}})
    rows += read_tests(out / "tests.xml")
    for r in read_rows(out / "bench.csv"):
        rows.append({"step": "bench", "case": f"{r['family']}/{r['kind']}/N={r['N']}/{r['mode']}", **r})
    for r in read_rows(out / "train.csv"):
        rows.append({"step": "train", "case": f"{r['experiment']}/{r['precision']}", **r})
    for r in read_rows(out / "plan.csv"):
        rows.append({"step": "plan", "case": f"{r['family']}/{r['kind']}/N={r['N']}/{r['mode']}/tile={r['tile']}", **r})
    return rows


def write_results(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = ["step", "case", "status"]
    for r in rows:
        columns += [k for k in r if k not in columns]
    with RowWriter(path, columns) as w:
        for r in rows:
            w.write(r)


# ------------------------------------------------------------------------------ markdown
def table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in body:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _num(cell: str | None, spec: str) -> str:
    v = number(cell)
    return "-" if v is None else format(v, spec)


def env_lines(env: dict[str, Any]) -> list[str]:
    if not env:
        return ["(env.json missing: the env step did not run)"]
    pk = env.get("packages", {})
    return [
        f"- card: **{env.get('card')}**" + (f" (compute capability {env['capability']}, "
                                           f"{env.get('gpu_memory_GiB')} GiB)" if env.get("capability") else ""),
        f"- nvidia-smi: {env.get('nvidia_smi') or '-'}",
        f"- torch {pk.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
        f"TF32 convolutions {env.get('tf32_conv')}, TF32 matmul {env.get('tf32_matmul')}",
        f"- python {env.get('python')}, {env.get('cpu_count')} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in pk.items() if k != "torch" and v),
        f"- command: `{env.get('command')}`, commit {env.get('commit') or 'unknown'}",
    ]


def bench_pivot(rows: Sequence[dict[str, str]]) -> list[str]:
    """Peak memory and step time per (family, kind, N) x mode; CUDA figures where measured."""
    cuda = any(number(r.get("cuda_peak_MiB")) is not None for r in rows)
    key, unit, spec = ("cuda_peak_MiB", "CUDA peak", ".0f") if cuda else ("probe_peak_MiB", "probe peak", ".2f")
    cells: dict[tuple[str, str, int], dict[str, str]] = {}
    for r in rows:
        cell = cells.setdefault((r["family"], r["kind"], int(r["N"])), {})
        if r["status"] == "ok":
            cell[r["mode"]] = f"{_num(r.get(key), spec)} / {_num(r.get('step_ms'), '.0f')}"
        else:
            cell[r["mode"]] = "OOM" if r["status"] == "oom" else r["status"]
    body = [(f, k, n, *(cells[f, k, n].get(m, "-") for m in MODES)) for (f, k, n) in sorted(cells)]
    return [f"{unit} MiB / median step ms (grad errors, anchors and the rest: results.csv)", "",
            *table(("family", "kind", "N", *MODES), body)]


def steps_section(steps: Path | None) -> list[str]:
    kit = read_rows(steps) if steps else []
    body = [(r["step"], r["status"], r["rc"], r["wall_s"], r["limit_s"]) for r in kit]
    return ["## Steps", "", *table(("step", "status", "exit", "s", "limit s"), body), ""]


def tests_section(out: Path) -> list[str]:
    tests = read_tests(out / "tests.xml")
    if not tests:
        return ["## CUDA tests (`pytest -m cuda`)", "", "(no tests.xml)", ""]
    counts = ", ".join(f"{sum(t['status'] == s for t in tests)} {s}" for s in ("passed", "failed", "error", "skipped"))
    body = [(t["case"], t["status"], _num(t["wall_s"], ".2f"), t["note"]) for t in tests]
    return ["## CUDA tests (`pytest -m cuda`)", "", counts, "", *table(("test", "outcome", "s", "message"), body), ""]


def bench_section(out: Path) -> list[str]:
    rows = read_rows(out / "bench.csv")
    if not rows:
        return ["## Memory benchmark (one training step)", "", "(no bench.csv)", ""]
    header = ("family", "kind", "N", "mode", "status", "CUDA peak MiB", "max alloc MiB", "probe MiB", "step ms",
              "steps", "grad rel err", "anchors", "fallbacks", "note")
    body = [(r["family"], r["kind"], r["N"], r["mode"], r["status"], _num(r["cuda_peak_MiB"], ".0f"),
             _num(r["cuda_max_alloc_MiB"], ".0f"), _num(r["probe_peak_MiB"], ".2f"), _num(r["step_ms"], ".1f"),
             r["timed_steps"], _num(r["grad_rel_err"], ".1e"), _num(r["anchors"], ".0f"), _num(r["fallbacks"], ".0f"),
             r["note"]) for r in rows]
    return ["## Memory benchmark (one training step)", "", *bench_pivot(rows), "", *table(header, body), ""]


def train_section(out: Path) -> list[str]:
    rows = read_rows(out / "train.csv")
    title = "## Training runs (`train.py +experiment=... trainer=gpu`, a few steps)"
    if not rows:
        return [title, "", "(no train.csv)", ""]
    header = ("experiment", "precision", "status", "steps", "peak_mem_gib", "source", "reserved GiB", "mem check",
              "loss check", "step s", "loss first / last", "val psnr", "MEL fallbacks", "W&B offline", "wall s", "note")
    body = [(r["experiment"], r["precision"], r["status"], r["train_steps"], _num(r["peak_mem_gib"], ".3f"),
             r["peak_mem_source"], _num(r["peak_mem_reserved_gib"], ".3f"), r["mem_check"], r["loss_check"],
             _num(r["step_time_s"], ".3f"), f"{_num(r['loss_first'], '.4g')} / {_num(r['loss_last'], '.4g')}",
             _num(r["val_psnr"], ".2f"), _num(r["mel_fallbacks"], ".0f"), r["wandb_offline"], _num(r["wall_s"], ".0f"),
             r["note"]) for r in rows]
    return [title, "", *table(header, body), ""]


def plan_section(out: Path) -> list[str]:
    rows = read_rows(out / "plan.csv")
    title = "## Memory plan (the model of model.memory=auto against the measured step)"
    if not rows:
        return [title, "", "(no plan.csv)", ""]
    header = ("family", "kind", "N", "mode", "anchors", "tile", "status", "probe MiB", "model probe MiB", "exact",
              "max alloc MiB", "model peak MiB", "model / measured", "step ms", "model rel. time", "note")
    body = [(r["family"], r["kind"], r["N"], r["mode"], r["anchor_every"], r["tile"], r["status"],
             _num(r["probe_MiB"], ".1f"), _num(r["model_probe_MiB"], ".1f"), r["probe_exact"],
             _num(r["cuda_max_alloc_MiB"], ".0f"), _num(r["model_peak_MiB"], ".0f"), _num(r["peak_ratio"], ".3f"),
             _num(r["step_ms"], ".1f"), _num(r["model_rel_time"], ".2f"), r["note"]) for r in rows]
    return [title, "", *table(header, body), ""]


def summary_md(out: Path, steps: Path | None) -> str:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    lines = [f"# melrecon GPU kit: {env.get('card', 'unknown device')}", "", *env_lines(env), "",
             *steps_section(steps), *tests_section(out), *bench_section(out), *train_section(out),
             *plan_section(out)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the kit's output folder")
    ap.add_argument("--steps", type=Path, default=None, help="run.sh's step table (CSV)")
    args = ap.parse_args(argv)
    rows = merged_rows(args.out, args.steps)
    write_results(args.out / "results.csv", rows)
    (args.out / "summary.md").write_text(summary_md(args.out, args.steps))
    print(f"summary: {len(rows)} rows -> {args.out / 'results.csv'}, {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
