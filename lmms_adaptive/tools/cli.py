"""What the package's command lines share: help that shows every flag's default, logging that prints above
progress bars, bars that suit a terminal and a CI log alike, and the time a command took for its summary."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
TERMINAL_REFRESH_S = 0.5
LOG_FILE_REFRESH_S = 30.0  # a bar on a non-terminal (a CI log) writes a line per refresh


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each flag's help ends with "(default: VALUE)", unless the help says its default
    itself, which a flag defaulting to None must (what None means), and a required flag says "(required)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "(required" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _AboveBars(logging.StreamHandler):
    """A stderr handler that writes through tqdm, so a log line never lands inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """INFO and above to stderr as `LEVEL logger: message`, above any progress bar (a no-op when the root
    logger already has handlers, as `logging.basicConfig`)."""
    handler = _AboveBars(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (count, rate, ETA) redrawn at most every 0.5 s on a terminal and every 30 s
    elsewhere. A loop that updates the postfix passes `refresh=False`, or it redraws every step."""
    interval = TERMINAL_REFRESH_S if sys.stderr.isatty() else LOG_FILE_REFRESH_S
    return tqdm(iterable, mininterval=interval, maxinterval=max(10.0, interval), **kwargs)


def took(started: float) -> str:
    """The time since `started` (a `time.perf_counter()` reading): 8.2s, 3m05s or 2h07m."""
    seconds = time.perf_counter() - started
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds % 60):02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
