"""Run folders of the resumable commands: one process at a time per folder, the settings a run was started
with, CSV logs cut back to the saved step on resume, atomic state files, and TensorBoard curves."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


class FolderInUse(RuntimeError):
    """Another process holds the run folder."""


@contextmanager
def exclusive(folder: Path, command: str) -> Iterator[None]:
    """Hold `folder` for this process (a lock file inside it) while the block runs; a second process asking
    for the same folder is refused at once instead of writing beside the first one."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderInUse(
            f"{folder} is in use by another {command} process: wait for it, or use another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_settings(path: Path, wanted: Mapping[str, Any]) -> None:
    """Write a new run's settings to `path`, or check that the run there was started with the same ones."""
    if not path.is_file():
        path.write_text(json.dumps(dict(wanted), indent=2) + "\n")
        return
    saved = json.loads(path.read_text())
    differs = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if differs:
        raise ValueError(
            f"{path} was written by a run with other settings (saved, asked): {differs}; "
            "use another output folder or the same settings"
        )


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: an interrupted save keeps the previous state."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def truncate_csv(path: Path, step: int) -> None:
    """Drop the rows of a log whose `step` is `step` or later (written after the saved state)."""
    if not path.is_file():
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if int(r["step"]) < step]
    if len(kept) != len(rows) and rows:
        write_rows(path, kept, list(rows[0]), mode="w")


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], mode: str = "a") -> None:
    """Append rows to a CSV log (a header first when the file is new), or rewrite it with mode "w"."""
    new = mode == "w" or not path.is_file()
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def plot_with_mean(
    ax: Any, steps: Sequence[int], values: Sequence[float], window: int, label: str = "per step"
) -> None:
    """A noisy per-step curve, faint, with its running mean over `window` steps on top."""
    values = np.asarray(values, dtype=float)
    ax.plot(steps, values, alpha=0.3, label=label)
    if len(values) >= window:
        ax.plot(
            steps[window - 1 :], np.convolve(values, np.ones(window) / window, mode="valid"), label=f"mean of {window}"
        )
    ax.legend(fontsize=7)


class TensorBoardCurves:
    """A CSV log's numeric columns, also as TensorBoard scalars `<prefix>/<column>` in `folder`, when the optional
    `tensorboard` package is installed; without it, one log line says so and `add` does nothing.

    `start`: the step a (resumed) run continues from; TensorBoard drops the events a previous process wrote
    from that step on, as `truncate_csv` drops the CSV rows."""

    def __init__(self, folder: Path, prefix: str, start: int) -> None:
        self.prefix = prefix
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard curves (pip install tensorboard to get them)")
            self._writer = None
            return
        self._writer = SummaryWriter(str(folder), purge_step=start, flush_secs=10)
        log.info("TensorBoard curves: %s", folder)

    def add(self, row: Mapping[str, Any]) -> None:
        """The row's numbers at its `step` (empty cells, e.g. a loss of a step without an update, are skipped)."""
        if self._writer is None:
            return
        for name, value in row.items():
            if name != "step" and isinstance(value, int | float):
                self._writer.add_scalar(f"{self.prefix}/{name}", value, int(row["step"]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
