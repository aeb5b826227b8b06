"""The command lines' habits: every flag has a one-line help that shows its default (or says it is required),
progress bars stay quiet in a log file, and GRPO curves go to TensorBoard when it is installed."""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmms_adaptive.tools import cli
from lmms_adaptive.tools.runlog import TensorBoardCurves

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "tasks")

# module -> the function(s) building its parser(s)
PARSERS = {
    "lmms_adaptive.tools.train": ("parser",),
    "lmms_adaptive.tools.profile": ("build_parser",),
    "lmms_adaptive.tools.importance": ("build_parser",),
    "lmms_adaptive.tools.estimator": ("build_parser",),
    "lmms_adaptive.tools.lookup": ("parser",),
    "lmms_adaptive.tools.report": ("build_parser", "build_compare_parser"),
    "lmms_adaptive.tools.convert": ("build_parser",),
    "lmms_adaptive.tools.results": ("build_parser",),
    "lmms_adaptive.default.pretrain": ("build_parser",),
    "lmms_adaptive.default.tiny": ("build_parser",),
}


def parsers() -> list[tuple[str, Callable[[], argparse.ArgumentParser]]]:
    return [(f"{module}.{name}", getattr(importlib.import_module(module), name)) for module, names in PARSERS.items()
            for name in names]  # fmt: skip


def with_subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from with_subcommands(sub)


def flat(text: str) -> str:
    """`text` without whitespace: argparse wraps lines between words, after hyphens and inside a long default
    (a comma-separated list has no space to break at)."""
    return "".join(text.split())


def test_every_command_line_module_is_checked() -> None:
    found = {
        ".".join(path.relative_to(REPO).with_suffix("").parts)
        for folder in ("tools", "default")
        for path in (REPO / "lmms_adaptive" / folder).glob("*.py")
        if '__name__ == "__main__"' in path.read_text()
    }
    assert found == set(PARSERS)


@pytest.mark.parametrize(("name", "build"), parsers(), ids=[name for name, _ in parsers()])
def test_every_flag_has_one_line_help_showing_its_default(
    name: str, build: Callable[[], argparse.ArgumentParser]
) -> None:
    for parser in with_subcommands(build()):
        shown = flat(parser.format_help())
        expand = parser._get_formatter()._expand_help
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip() and "\n" not in action.help, f"{where}: no one-line help"
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), f"{where}: a subcommand without help"
                continue
            text = expand(action)
            if action.option_strings:
                said = "(required" if action.required else "(default"
                assert said in text, f"{where}: the help {text!r} does not say {said}...)"
            assert flat(text) in shown, f"{where}: --help does not show {text!r}"


def test_defaults_come_from_the_flags_themselves() -> None:
    from lmms_adaptive.default.pretrain import PretrainConfig, build_parser
    from lmms_adaptive.tools.train import TrainConfig, parser

    train_help = flat(parser().format_help())
    assert flat(f"(default: {TrainConfig().steps})") in train_help and flat("(default: 70.0,300.0)") in train_help
    assert flat(f"decoder-stage steps (default: {PretrainConfig().steps})") in flat(build_parser().format_help())


def test_bars_redraw_rarely_in_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    log_file = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log_file)
    bar = cli.progress(range(10_000), desc="rows", unit="row", file=log_file)
    for _ in bar:
        bar.set_postfix(x=1, refresh=False)
    assert bar.mininterval == cli.LOG_FILE_REFRESH_S
    assert log_file.getvalue().count("\r") <= 3  # the first draw and the last, not a line per row
    assert "10000/10000" in log_file.getvalue() and "row/s" in log_file.getvalue()


def test_log_lines_print_above_a_bar() -> None:
    stream = io.StringIO()
    handler = cli._AboveBars(stream)
    handler.setFormatter(logging.Formatter(cli.LOG_FORMAT))
    record = logging.LogRecord("lmms_adaptive.x", logging.INFO, __file__, 1, "wrote %d rows", (3,), None)
    handler.emit(record)
    assert stream.getvalue() == "INFO lmms_adaptive.x: wrote 3 rows\n"


@pytest.mark.parametrize(("seconds", "shown"), [(8.24, "8.2s"), (185, "3m05s"), (7620, "2h07m")])
def test_took(monkeypatch: pytest.MonkeyPatch, seconds: float, shown: str) -> None:
    monkeypatch.setattr(cli.time, "perf_counter", lambda: 1000.0 + seconds)
    assert cli.took(1000.0) == shown


# ----------------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------------

SHORT = {
    "tasks": ("synth_pope_val",), "include_path": (TASKS,), "limit": 2, "eval_tasks": (), "steps": 2,
    "group_size": 2, "requests_per_step": 1, "save_every": 1, "max_new_tokens": 4,
}  # fmt: skip


def test_tensorboard_curves_get_the_csv_scalars_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoardCurves(tmp_path, "grpo", 0)
    board.add({"step": 0, "reward_mean": 0.5, "pg_loss": "", "updated": 1})
    board.add({"step": 1, "reward_mean": 0.75, "pg_loss": -0.1, "updated": 0})
    board.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["grpo/pg_loss", "grpo/reward_mean", "grpo/updated"]
    assert [(e.step, e.value) for e in events.Scalars("grpo/reward_mean")] == [(0, 0.5), (1, 0.75)]
    assert [e.step for e in events.Scalars("grpo/pg_loss")] == [1]  # the empty cell is skipped
    resumed = TensorBoardCurves(tmp_path, "grpo", 1)  # a run resumed at step 1 logs it again
    resumed.add({"step": 1, "reward_mean": 0.25})
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("grpo/reward_mean")] == [(0, 0.5), (1, 0.25)]


def test_grpo_run_writes_tensorboard_curves(tmp_path: Path, lmms_env) -> None:
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmms_adaptive.tools.train import TrainConfig, train

    train(tmp_path / "run", TrainConfig(**SHORT), device="cpu")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rewards = [float(r["reward_mean"]) for r in csv.DictReader(f)]
    logged = [(e.step, e.value) for e in events.Scalars("grpo/reward_mean")]
    assert logged == [(i, pytest.approx(r)) for i, r in enumerate(rewards)]


def test_grpo_run_without_tensorboard(tmp_path: Path, lmms_env, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from lmms_adaptive.tools.train import TrainConfig, train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    with caplog.at_level(logging.INFO, logger="lmms_adaptive.tools.runlog"):
        artifact = train(tmp_path / "run", TrainConfig(**SHORT), device="cpu")
    assert artifact.is_file() and not (tmp_path / "run" / "tensorboard").exists()
    assert any("tensorboard is not installed" in r.getMessage() for r in caplog.records)
