"""Check an lmms-eval run's results file (its CLI exits 0 even when the evaluation failed) and print what the
run did: per task the score, latency, budget violations and plans, and per question type where tasks have one.

    python -m lmms_adaptive.tools.results OUTPUT_PATH --tasks textvqa_val_local,mme_local,pope_local
    python -m lmms_adaptive.tools.results OUTPUT_PATH --tasks synth_vqa_test --floor synth_vqa_test:exact_match=0.3
exits non-zero unless a results JSON under OUTPUT_PATH holds metrics for every task (and every floor holds).
The table reads the plugin's records (`OUTPUT_PATH/adaptive_molmoe/*.jsonl`) and, per question type, the
per-sample scores of lmms-eval's samples files (`--log_samples`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmms_adaptive.serving.records import RequestRecord, read_records, summarize
from lmms_adaptive.tools.cli import HelpFormatter

RECORDS_DIR = "adaptive_molmoe"  # the plugin's record folder under lmms-eval's --output_path


def latest_results(output_path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest `*_results.json` below `output_path` (lmms-eval may add a model-name subfolder)."""
    files = sorted(Path(output_path).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {output_path}: the evaluation failed (see its log)")
    return files[-1], json.loads(files[-1].read_text())


def task_metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    """Numeric metrics of one task (`"metric,filter"` keys, stderr entries left out)."""
    entry = results.get("results", {}).get(task, {})
    return {k: v for k, v in entry.items() if "," in k and "stderr" not in k and isinstance(v, int | float)}


def primary_metric(task_results: dict[str, Any]) -> tuple[str, float] | None:
    """The main score of one `results[task]` entry of lmms-eval, as (name, value).

    Rule: the first numeric `metric,filter` entry in lmms-eval's order (the task YAML's `metric_list`
    order, whose first metric is the task's headline: exact_match, pope_accuracy, ...), leaving out
    stderr entries, `alias`, and textvqa's `submission` (a file, not a score). MME is the exception:
    its headline is the total, perception + cognition, reported as `mme_total_score`.
    The name drops the filter when it is `none`. None when the entry has no score.
    """
    scores = {
        key: float(value)
        for key, value in task_results.items()
        if "," in key
        and "_stderr" not in key
        and key.split(",")[0] != "submission"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }
    parts = ("mme_perception_score,none", "mme_cognition_score,none")
    if all(p in scores for p in parts):
        return "mme_total_score", sum(scores[p] for p in parts)
    if not scores:
        return None
    key, value = next(iter(scores.items()))
    name, filt = key.split(",", 1)
    return (name if filt == "none" else key), value


@dataclass(frozen=True)
class Line:
    """One line of the run table: requests of one task, or of one question type of a task."""

    label: str
    n: int
    score: float | None
    latency_mean_ms: float
    latency_p95_ms: float
    violation_rate: float | None
    plans: str  # the most used plans with their shares


def line(label: str, records: Sequence[RequestRecord], score: float | None) -> Line:
    stats = summarize(records)
    top = Counter(r.plan.key for r in records).most_common(2)
    plans = ", ".join(f"{key} {count / len(records):.0%}" for key, count in top)
    return Line(
        label, len(records), score, stats["latency_mean_ms"], stats["latency_p95_ms"], stats["violation_rate"], plans
    )


def sample_scores(output_path: Path, task: str, results: dict[str, Any]) -> dict[int, float]:
    """doc_id -> the task's per-sample score in the newest `*_samples_<task>.jsonl` (the primary metric's
    value, or its `score` where the scorer returns a dict); empty without samples files."""
    files = sorted(output_path.rglob(f"*_samples_{task}.jsonl"), key=lambda p: p.stat().st_mtime)
    entry = results.get("results", {}).get(task, {})
    primary = primary_metric(entry)
    names = [primary[0]] if primary else []
    names += [k.split(",")[0] for k in entry if "," in k and "stderr" not in k]
    scores = {}
    for row in (json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()) if files else ():
        value = next((row[name] for name in names if name in row), None)
        value = value.get("score") if isinstance(value, dict) else value
        if isinstance(value, int | float) and not isinstance(value, bool):
            scores[int(row["doc_id"])] = float(value)
    return scores


def run_table(output_path: Path, tasks: Sequence[str], results: dict[str, Any]) -> list[Line]:
    """Per task (score from the results file), then per question type of it (score from the samples)."""
    files = sorted((output_path / RECORDS_DIR).glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    records = read_records(files[-1]) if files else []
    lines = []
    for task in tasks:
        mine = [r for r in records if r.task == task]
        if not mine:
            continue
        primary = primary_metric(results.get("results", {}).get(task, {}))
        lines.append(line(task, mine, primary[1] if primary else None))
        types = sorted({r.question_type for r in mine if r.question_type is not None})
        scores = sample_scores(output_path, task, results) if types else {}
        for qtype in types:
            of_type = [r for r in mine if r.question_type == qtype]
            known = [scores[r.doc_id] for r in of_type if r.doc_id in scores]
            lines.append(line(f"  {qtype}", of_type, float(np.mean(known)) if known else None))
    return lines


def format_table(lines: Sequence[Line], format_checks: Sequence[str] = ()) -> str:
    """A fixed-width table; tasks named in `format_checks` are marked as such."""
    rows = [
        f"{'task / question type':<24} {'n':>4} {'score':>8} {'mean ms':>8} {'p95 ms':>8} {'over budget':>11}  plans"
    ]
    for ln in lines:
        over = "-" if ln.violation_rate is None else f"{ln.violation_rate:.1%}"
        score = "-" if ln.score is None else f"{ln.score:.3f}"
        mark = " (format check)" if ln.label in format_checks else ""
        rows.append(f"{ln.label:<24} {ln.n:>4} {score:>8} {ln.latency_mean_ms:>8.1f} {ln.latency_p95_ms:>8.1f} "
                    f"{over:>11}  {ln.plans}{mark}")  # fmt: skip
    return "\n".join(rows)


def parse_floor(spec: str) -> tuple[str, str, float]:
    """ "TASK:METRIC=VALUE" -> (task, metric, value); METRIC is the results key before the comma."""
    target, sep, value = spec.rpartition("=")
    task, colon, metric = target.partition(":")
    try:
        if not (sep and colon and task and metric):
            raise ValueError
        return task, metric, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--floor must look like TASK:METRIC=VALUE, got {spec!r}") from None


def below_floor(results: dict[str, Any], task: str, metric: str, floor: float) -> str | None:
    """Why `task`'s `metric` fails its floor, or None when it holds."""
    values = [v for k, v in task_metrics(results, task).items() if k.split(",")[0] == metric]
    if not values:
        return f"{task} has no metric {metric!r} (has {sorted(task_metrics(results, task))})"
    return None if values[0] >= floor else f"{task} {metric} = {values[0]:.4f} < floor {floor}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.results", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("output_path", type=Path, help="the --output_path given to lmms-eval")
    parser.add_argument("--tasks", required=True, help="comma-separated task names that must have metrics (required)")
    parser.add_argument("--format-checks", default="", metavar="TASKS",
                        help="comma-separated tasks to mark as format checks, real-benchmark configs on fixtures "
                        "(default: none)")  # fmt: skip
    parser.add_argument("--floor", type=parse_floor, action="append", default=[], metavar="TASK:METRIC=VALUE",
                        help="a metric that must reach VALUE (repeatable), e.g. synth_vqa_test:exact_match=0.3 "
                        "(default: none)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, results = latest_results(args.output_path)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    tasks = [t for t in args.tasks.split(",") if t]
    missing = [t for t in tasks if not task_metrics(results, t)]
    print(format_table(run_table(args.output_path, tasks, results), args.format_checks.split(",")))
    print(f"results: {path}\nrecords and summary: {args.output_path / RECORDS_DIR}")
    if missing:
        print(f"{path}: no metrics for {', '.join(missing)}", file=sys.stderr)
        return 1
    failed = [why for why in (below_floor(results, *floor) for floor in args.floor) if why]
    if failed:
        print(f"{path}: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
