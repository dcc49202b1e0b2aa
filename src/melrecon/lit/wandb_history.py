"""Give a resumed run's offline W&B run its whole history, each record once.

W&B offline writes each invocation into its own ``<run>/wandb/offline-run-<time>-<id>/`` and
buffers that file in its service process: after ``kill -9`` the killed invocation's file may hold
nothing at all (measured with wandb 0.31: ten logged rows, 8 s later, SIGKILL: a 7-byte file,
the header). And ``wandb sync`` does not join offline folders of one run id: the folder synced
last replaces the run's history (wandb/wandb#3841, #5865). So the folder of the resumed
invocation must hold the whole history on its own.

The run folder is the durable record: :class:`melrecon.lit.loggers.ResumableCSVLogger` keeps
every ``log_metrics`` row below the checkpoint's global step, and
:class:`melrecon.lit.callbacks.ReconImageLogger` saves each validation strip (with its caption)
as ``images/step{S:07d}_item{i}.png`` (+ ``.gif`` for cine). On resume,
:func:`rebuild_on_resume` moves the earlier offline folders of the run id to
``wandb/superseded/`` (kept, not for syncing) and logs into the new offline run, before training
continues, every CSV row with step < G (G = the checkpoint's global step) and every saved strip
with step <= G (validation runs at step G before the checkpoint at G is written; the CSV logs
that validation at G - 1). Rows the resumed run logs again (steps >= G) are not replayed.

Online runs are left as W&B resumes them: the server holds what the interrupted invocation had
uploaded and cannot be truncated without W&B's private-preview "rewind"; the CSV is exact.
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pytorch_lightning.utilities import rank_zero_only

from melrecon.export import PNG_DESCRIPTION_KEY
from melrecon.lit.callbacks import STRIP_NAME, ReconImageLogger, log_wandb_strip

log = logging.getLogger("melrecon")



@dataclass(frozen=True)
class Rebuilt:
    """What :func:`rebuild_offline_history` did.

    Attributes:
        rows: CSV rows logged into the new W&B run.
        images: saved strips logged (a cine GIF beside a strip counts with it).
        superseded: earlier offline folders of this run id, as moved (under ``wandb/superseded/``).
    """

    rows: int
    images: int
    superseded: tuple[Path, ...]


def csv_rows_before(csv_file: Path, step: int) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of each row of a Lightning ``metrics.csv`` with step < ``step``, in file order.

    Empty cells are keys the row did not log; ``epoch`` is a metric, as Lightning logs it.
    """
    out = []
    with open(csv_file, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            s = int(float(row["step"]))
            if s >= step:
                continue
            metrics = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
            if metrics:
                out.append((s, metrics))
    return out


def saved_strips_upto(images_dir: Path | None, step: int) -> list[tuple[int, int, Path]]:
    """(step, item, png) of the strips saved in ``images_dir`` at step <= ``step``, by step and item."""
    if images_dir is None or not images_dir.is_dir():
        return []
    found = []
    for p in images_dir.iterdir():
        m = STRIP_NAME.match(p.name)
        if m and int(m.group(1)) <= step:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def _supersede(run_dir: Path, run_id: str) -> tuple[Path, ...]:
    """Move ``run_dir``'s sibling offline folders of ``run_id`` into ``<wandb>/superseded/``."""
    wandb_dir = run_dir.parent
    moved = []
    for old in sorted(wandb_dir.glob(f"offline-run-*-{run_id}")):
        if old.resolve() == run_dir.resolve() or not old.is_dir():
            continue
        dest = wandb_dir / "superseded" / old.name
        dest.parent.mkdir(exist_ok=True)
        n = 1
        while dest.exists():  # a name used before (a third resume within one second)
            dest, n = dest.with_name(f"{old.name}.{n}"), n + 1
        shutil.move(str(old), dest)
        moved.append(dest)
    return tuple(moved)


def rebuild_offline_history(logger: Any, csv_file: Path, resume_step: int,
                            images_dir: Path | None = None) -> Rebuilt | None:
    """Move the earlier offline folders aside and replay the run folder's history into ``logger``.

    Args:
        logger: a Lightning ``WandbLogger`` of the resumed run (its experiment is created here).
        csv_file: the run's ``metrics.csv`` (ResumableCSVLogger).
        resume_step: G, the checkpoint's global step; rows at G or later are the resumed run's.
        images_dir: ReconImageLogger's ``save_dir`` (None: no strips to replay).

    Returns:
        what was done, or None for an online run (left as W&B resumes it) or a disabled one.
    """
    run = logger.experiment
    if getattr(run, "disabled", False):  # WANDB_MODE=disabled: nothing is written
        return None
    if not run.offline:
        log.warning("W&B online: the resumed run continues what the interrupted one had uploaded; "
                    "records it had not uploaded are missing there and steps from %d on may appear "
                    "twice (%s holds the exact history)", resume_step, csv_file)
        return None
    moved = _supersede(Path(run.sync_dir), run.id)
    rows = csv_rows_before(csv_file, resume_step)
    strips = saved_strips_upto(images_dir, resume_step)
    images = _replay(logger, rows, strips)
    return Rebuilt(rows=len(rows), images=images, superseded=moved)


def _replay(logger: Any, rows: list[tuple[int, dict[str, float]]], strips: list[tuple[int, int, Path]]) -> int:
    """Log rows and strips in step order (a step's rows before its strips); return the strips logged."""
    from PIL import Image

    events: list[tuple[int, int, Any]] = [(s, 0, m) for s, m in rows]
    events += [(s, 1, (item, png)) for s, item, png in strips]
    logged = 0
    for step, kind, payload in sorted(events, key=lambda e: (e[0], e[1])):  # stable: file order kept
        if kind == 0:
            logger.log_metrics(payload, step)
            continue
        item, png = payload
        try:
            with Image.open(png) as im:
                im.load()  # a strip cut short by the kill fails here, not inside W&B
                caption = im.info.get(PNG_DESCRIPTION_KEY, f"{png.name} (caption not saved)")
        except OSError as err:
            log.warning("W&B history: %s is not a readable PNG (%s); not replayed", png, err)
            continue
        gif = png.with_suffix(".gif")
        log_wandb_strip(logger, item, png, caption, step, gif if gif.is_file() else None)
        logged += 1
    return logged


@rank_zero_only
def rebuild_on_resume(loggers: Iterable[Any], callbacks: Iterable[Any], resume_step: int) -> None:
    """For each W&B logger of a resumed run, :func:`rebuild_offline_history` from the run's CSV
    logger and image folder (found among ``loggers`` and ``callbacks``); without a CSV logger the
    history cannot be rebuilt, which is said (and the earlier folders stay where they are)."""
    from pytorch_lightning.loggers import WandbLogger

    from melrecon.lit.loggers import ResumableCSVLogger

    loggers = list(loggers)
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    csv_loggers = [lg for lg in loggers if isinstance(lg, ResumableCSVLogger)]
    if not csv_loggers:
        log.warning("resuming without the csv logger (logger=wandb_csv, the default, has it): the W&B "
                    "history before step %d cannot be rebuilt; what the earlier offline folders in "
                    "wandb/ hold may be partial, and `wandb sync` of the newest replaces the others",
                    resume_step)
        return
    csv_file = Path(csv_loggers[0].log_dir) / "metrics.csv"
    if not csv_file.is_file():
        log.warning("resuming: %s does not exist; the W&B history before step %d is not rebuilt",
                    csv_file, resume_step)
        return
    images = next((cb.save_dir for cb in callbacks if isinstance(cb, ReconImageLogger)), None)
    for lg in wandb_loggers:
        done = rebuild_offline_history(lg, csv_file, resume_step, images)
        if done is not None:
            log.info("W&B offline run %s rebuilt from the run folder: %d rows and %d images before "
                     "step %d%s", lg.experiment.id, done.rows, done.images, resume_step,
                     f"; earlier offline folders moved to {done.superseded[0].parent}" if done.superseded else "")


__all__ = ["Rebuilt", "csv_rows_before", "saved_strips_upto", "rebuild_offline_history", "rebuild_on_resume"]
