"""Reports over evaluation runs: per-task tables (score, latency, violations, knobs) and score/latency plots.

    python -m lmms_adaptive.tools.report RUN_DIR [RUN_DIR ...] --out OUT [--profile PROFILE_DIR]
    python -m lmms_adaptive.tools.report compare --controllers static,lookup=controllers/lookup.json \\
        --budgets 50,100,200 --tasks synth_vqa_test,synth_pope_test --include-path tasks --out OUT

An evaluation run is one lmms-eval `--output_path` folder for one (controller, budget): lmms-eval's
`*_results.json` (task metrics) and the plugin's records (`adaptive_molmoe/*.jsonl`, one line per
request). A RUN_DIR may be a run folder or any folder above run folders.

The task metric comes from lmms-eval's results; every other column is computed from the records.
With `--profile`, each plan of a profiling sweep becomes a grey point on the plots (mean per-sample
score against mean latency), with the fixed plans' frontier (`frontier`: what mixing two plans reaches) as
a dotted line; every row gets its score's distance above that frontier at its mean latency ("vs frontier"),
and rows from the profile join the tables at the runs' budgets: the per-request oracle (best measured plan
per request), the per-question-type oracle, and the best fixed plan with at most 2 % of requests over budget
(`lookup.ORACLES`).

`compare` runs lmms-eval once per (controller, budget) into `OUT/runs/<name>@<budget>` and then
writes the report into OUT. A static controller ignores the budget, yet it is run at every budget
too: its scores and latencies repeat, but its violation rate is per budget. Runs whose results
exist are skipped, so an interrupted compare resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmms_adaptive.controllers import LOADERS
from lmms_adaptive.core.checkpoint import resolve_checkpoint
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.serving.records import RequestRecord, read_records, summarize
from lmms_adaptive.tools.cli import HelpFormatter, progress, setup_logging, took
from lmms_adaptive.tools.lookup import oracle_summary
from lmms_adaptive.tools.profile import read_profile
from lmms_adaptive.tools.results import RECORDS_DIR, latest_results, primary_metric

log = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"  # written by `compare`: the controller name given on its command line
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ORACLE = "oracle"

# ----------------------------------------------------------------------------------------------------
# Loading runs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRun:
    task: str
    metric: str | None  # None when lmms-eval reported no numeric metric for the task
    score: float | None
    records: list[RequestRecord]


@dataclass(frozen=True)
class RunResult:
    folder: Path
    controller: str  # label: "static[crops12_k8_b16_p1]", "lookup", ... or the name given to `compare`
    budget_ms: float | None
    tasks: dict[str, TaskRun]


def controller_label(description: dict[str, Any]) -> str:
    """A short name for `Controller.describe()`: the kind, with the plan for a static controller."""
    if description.get("kind") == "static" and "plan" in description:
        return f"static[{Plan(**description['plan']).key}]"
    return str(description.get("kind", "unknown"))


def is_run_folder(folder: Path) -> bool:
    return (folder / RECORDS_DIR).is_dir() or any(folder.glob("*_results.json"))


def discover_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among `paths` and below them (a run folder's own subfolders are not searched)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"not a folder: {path}")
        if is_run_folder(path):
            found.append(path)
        else:
            found.extend(discover_runs(sorted(p for p in path.iterdir() if p.is_dir())))
    return found


def load_run(folder: str | Path) -> RunResult:
    """One run folder: the newest results file and every record file of the plugin."""
    folder = Path(folder)
    _, results = latest_results(folder)
    record_files = sorted((folder / RECORDS_DIR).glob("*.jsonl"))
    records = [r for path in record_files for r in read_records(path)]
    if not records:
        raise ValueError(
            f"{folder}: no request records in {folder / RECORDS_DIR} (was lmms-eval run with --output_path?)"
        )
    controller = _single(folder, "controller", [json.dumps(r.controller, sort_keys=True) for r in records])
    budget = _single(folder, "budget_ms", [r.budget_ms for r in records])
    manifest = folder / RUN_MANIFEST
    label = (
        json.loads(manifest.read_text())["label"] if manifest.is_file() else controller_label(json.loads(controller))
    )
    by_task: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    tasks = {}
    for task in sorted(set(results.get("results", {})) | set(by_task)):
        metric = primary_metric(results.get("results", {}).get(task, {}))
        name, score = metric if metric else (None, None)
        tasks[task] = TaskRun(task, name, score, by_task.get(task, []))
    return RunResult(folder, label, budget, tasks)


def _single(folder: Path, field: str, values: Sequence[Any]) -> Any:
    distinct = set(values)
    if len(distinct) != 1:
        raise ValueError(
            f"{folder}: records disagree on {field} ({sorted(map(str, distinct))}): one run folder per evaluation"
        )
    return values[0]


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    controller: str
    budget_ms: float | None
    metric: str | None
    score: float | None
    latency_mean_ms: float
    latency_p95_ms: float
    violation_rate: float | None  # fraction of requests over budget; None without a budget
    mean_max_crops: float
    mean_top_k: float
    mean_blocks: float
    n_requests: int
    source: str = "run"  # "run" (an lmms-eval run) or "oracle" (from profile rows)
    above_frontier: float | None = None  # score minus the fixed plans' frontier at this mean latency


def run_row(run: RunResult, task: str) -> TableRow | None:
    """The table row of one run for one task; None when the run has no records for it."""
    entry = run.tasks.get(task)
    if entry is None or not entry.records:
        return None
    stats = summarize(entry.records)
    plans = [r.plan for r in entry.records]
    return TableRow(
        controller=run.controller,
        budget_ms=run.budget_ms,
        metric=entry.metric,
        score=entry.score,
        latency_mean_ms=stats["latency_mean_ms"],
        latency_p95_ms=stats["latency_p95_ms"],
        violation_rate=stats["violation_rate"],
        mean_max_crops=float(np.mean([p.max_crops for p in plans])),
        mean_top_k=float(np.mean([p.top_k for p in plans])),
        mean_blocks=float(np.mean([p.n_blocks for p in plans])),
        n_requests=stats["n_requests"],
    )


def _row_order(row: TableRow) -> tuple:
    return row.source == ORACLE, row.controller, row.budget_ms is not None, row.budget_ms or 0.0


def task_tables(runs: Sequence[RunResult], extra: Sequence[tuple[str, TableRow]] = ()) -> dict[str, list[TableRow]]:
    """Rows per task, sorted by controller then budget; `extra` (task, row) pairs (the oracle) come last."""
    tables: dict[str, list[TableRow]] = defaultdict(list)
    for run in runs:
        for task in run.tasks:
            row = run_row(run, task)
            if row is not None:
                tables[task].append(row)
    for task, row in extra:
        tables[task].append(row)
    return {task: sorted(rows, key=_row_order) for task, rows in sorted(tables.items())}


CSV_FIELDS = (
    "controller", "budget_ms", "metric", "score", "latency_mean_ms", "latency_p95_ms", "violation_rate_pct",
    "above_frontier", "mean_max_crops", "mean_top_k", "mean_blocks", "n_requests", "source",
)  # fmt: skip


def csv_record(row: TableRow) -> dict[str, Any]:
    out = asdict(row)
    rate = out.pop("violation_rate")
    out["violation_rate_pct"] = None if rate is None else 100.0 * rate
    return {k: out[k] for k in CSV_FIELDS}


def table_metric(rows: Sequence[TableRow]) -> str:
    return next((r.metric for r in rows if r.metric and r.source != ORACLE), "score")


def markdown_table(rows: Sequence[TableRow]) -> str:
    header = ["controller", "budget (ms)", table_metric(rows), "mean latency (ms)", "p95 latency (ms)",
              "violations (%)", "vs frontier", "mean max_crops", "mean top_k", "mean blocks", "n requests"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = f"{r.controller} (profile)" if r.source == ORACLE else r.controller
        cells = [
            name, _num(r.budget_ms, "g"), _num(r.score, ".4g"), _num(r.latency_mean_ms, ".1f"), _num(r.latency_p95_ms, ".1f"),
            _num(None if r.violation_rate is None else 100.0 * r.violation_rate, ".1f"), _num(r.above_frontier, "+.3f"),
            _num(r.mean_max_crops, ".2f"), _num(r.mean_top_k, ".2f"), _num(r.mean_blocks, ".2f"), str(r.n_requests),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tier_shares(records: Sequence[RequestRecord]) -> dict[str, dict[int, float]]:
    """Per question type (sorted; requests without one left out): the share of its requests served at each
    vision tier (max_crops), over the tiers any of `records` used."""
    tiers = sorted({r.plan.max_crops for r in records})
    by_type: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if r.question_type is not None:
            by_type[r.question_type].append(r.plan.max_crops)
    return {q: {t: chosen.count(t) / len(chosen) for t in tiers} for q, chosen in sorted(by_type.items())}


def tier_table(runs: Sequence[RunResult], task: str) -> str:
    """Markdown: per run (sorted by controller, budget) the tiers chosen per question type of `task`, as
    percentages of that type's requests; "" when the task's records carry no question types."""
    cells = {(r.controller, r.budget_ms): tier_shares(r.tasks[task].records) for r in runs if task in r.tasks}
    types = sorted({q for shares in cells.values() for q in shares})
    if not types:
        return ""
    tiers = sorted({t for shares in cells.values() for q in shares.values() for t in q})
    head = ["controller", "budget (ms)", *(f"{q} ({'/'.join(map(str, tiers))} crops, %)" for q in types)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, budget), shares in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
        row = ["/".join(f"{100 * shares[q].get(t, 0.0):.0f}" for t in tiers) if q in shares else "—" for q in types]
        lines.append("| " + " | ".join([name, _num(budget, "g"), *row]) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


# ----------------------------------------------------------------------------------------------------
# Profile: static plan points and oracle rows
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanPoint:
    plan: str  # plan key
    score: float  # mean per-sample score over the task's samples
    latency_mean_ms: float
    n_samples: int


def plan_points(rows: Sequence[RequestRecord], task: str) -> list[PlanPoint]:
    """Every static plan measured for `task` in a profile, as (mean score, mean total_ms)."""
    by_plan: dict[str, list[RequestRecord]] = defaultdict(list)
    for row in rows:
        if row.task == task:
            by_plan[row.plan.key].append(row)
    return [
        PlanPoint(
            key, float(np.mean([r.score for r in group])), float(np.mean([r.total_ms for r in group])), len(group)
        )
        for key, group in sorted(by_plan.items())
    ]


def frontier(points: Sequence[PlanPoint]) -> list[PlanPoint]:
    """The fixed plans' score-vs-mean-latency frontier, by increasing latency: the upper concave hull from the
    fastest plan (the best-scoring of equally fast ones) to the best-scoring plan. Serving a share of the
    requests with one plan and the rest with another reaches every point of the segment between them."""
    hull: list[PlanPoint] = []
    for p in sorted(points, key=lambda p: (p.latency_mean_ms, -p.score)):
        if hull and p.score <= hull[-1].score:
            continue  # slower and no better: under the frontier
        while len(hull) >= 2 and _not_below(hull[-2], hull[-1], p):
            hull.pop()
        hull.append(p)
    return hull


def _not_below(a: PlanPoint, b: PlanPoint, c: PlanPoint) -> bool:
    """Whether b lies on or under the segment a-c (a, b, c by increasing latency)."""
    return (b.latency_mean_ms - a.latency_mean_ms) * (c.score - a.score) >= (b.score - a.score) * (
        c.latency_mean_ms - a.latency_mean_ms
    )


def frontier_score(hull: Sequence[PlanPoint], latency_ms: float) -> float:
    """The frontier's score at a mean latency: linear between hull points; the fastest plan's score below
    it (no fixed plan is faster), the best score above the slowest hull point."""
    return float(np.interp(latency_ms, [p.latency_mean_ms for p in hull], [p.score for p in hull]))


def with_frontier_gaps(rows: Sequence[TableRow], points: Sequence[PlanPoint]) -> list[TableRow]:
    """Rows with `above_frontier` set, where the row's score is on the plan points' 0-1 scale."""
    if not points:
        return list(rows)
    hull = frontier(points)
    return [
        replace(r, above_frontier=r.score - frontier_score(hull, r.latency_mean_ms))
        if r.score is not None and 0.0 <= r.score <= 1.0
        else r
        for r in rows
    ]


def oracle_rows(rows: Sequence[RequestRecord], budgets: Sequence[float]) -> list[tuple[str, TableRow]]:
    """(task, row) per oracle, task and budget (`lookup.oracle_summary`): the best measured plan per sample
    that fits the budget, the plan per question type a lookup table of that type picks, and the best plan to
    fix for the budget (at most 2 % of requests over it)."""
    return [
        (
            s.task,
            TableRow(
                controller=s.name,
                budget_ms=s.budget_ms,
                metric="mean_sample_score",
                score=s.score,
                latency_mean_ms=s.latency_mean_ms,
                latency_p95_ms=s.latency_p95_ms,
                violation_rate=s.violation_rate,
                mean_max_crops=s.knobs["max_crops"],
                mean_top_k=s.knobs["top_k"],
                mean_blocks=s.knobs["n_blocks"],
                n_requests=s.n_samples,
                source=ORACLE,
            ),
        )
        for s in oracle_summary(rows, budgets)
    ]


def default_budgets(rows: Sequence[RequestRecord], n: int = 5) -> list[float]:
    """`n` budgets evenly spread over the profile's per-request latencies, 5th to 95th percentile
    (the extremes are single slow or fast requests), rounded to whole milliseconds."""
    if not rows:
        raise ValueError("the profile has no rows: give --budgets")
    low, high = np.percentile([r.total_ms for r in rows], [5, 95])
    return sorted({float(max(1, round(b))) for b in np.linspace(low, high, n)})


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def plot_task(task: str, rows: Sequence[TableRow], points: Sequence[PlanPoint], path: Path) -> Path:
    """Score against mean latency: static plans of the profile in grey, one curve per controller over its
    budgets (annotated). Plan points are mean 0-1 per-sample scores; when the task metric is on another
    scale (MME's summed scores) they go on a right-hand axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    run_scores = [r.score for r in rows if r.score is not None and r.source != ORACLE]
    same_scale = all(0.0 <= s <= 1.0 for s in run_scores)
    if points:
        plan_ax = ax if same_scale else ax.twinx()
        plan_ax.scatter([p.latency_mean_ms for p in points], [p.score for p in points], color="0.7", s=14,
                        label="static plans (profile)", zorder=1)  # fmt: skip
        hull = frontier(points)
        plan_ax.plot([p.latency_mean_ms for p in hull], [p.score for p in hull], ":", color="0.5",
                     label="fixed-plan frontier", zorder=1)  # fmt: skip
        if not same_scale:
            plan_ax.set_ylabel("mean per-sample score (profile)")
    curves: dict[str, list[TableRow]] = defaultdict(list)
    for row in rows:
        if row.score is not None:
            curves[row.controller].append(row)
    for name, group in curves.items():
        group = sorted(group, key=_row_order)
        style = "--" if group[0].source == ORACLE else "-"
        ax.plot([r.latency_mean_ms for r in group], [r.score for r in group], style, marker="o", label=name, zorder=2)
        for r in group:
            ax.annotate(
                _num(r.budget_ms, "g"),
                (r.latency_mean_ms, r.score),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xlabel("mean latency per request (ms)")
    ax.set_ylabel(table_metric(rows))
    ax.set_title(f"{task}: score vs latency (labels: budget ms)")
    handles, labels = [], []
    for a in fig.axes:
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Writing a report
# ----------------------------------------------------------------------------------------------------


def write_report(runs: Sequence[RunResult], out: str | Path, profile: Sequence[RequestRecord] = ()) -> Path:
    """`report_<task>.md/.csv/.png` per task and the combined `report.md` in `out`; returns report.md.

    With profile rows: grey plan points and the fixed-plan frontier on the plots, each row's distance above
    that frontier, and oracle rows at the runs' budgets."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = sorted({r.budget_ms for r in runs if r.budget_ms is not None})
    run_tasks = {task for run in runs for task in run.tasks}
    extra = [(t, row) for t, row in oracle_rows(profile, budgets) if t in run_tasks] if profile and budgets else []
    tables = task_tables(runs, extra)
    sections = [
        "# Latency-budgeted evaluation report\n",
        f"Runs: {len(runs)}. Metric from lmms-eval results; the other columns from the request records.\n",
    ]
    for task, rows in tables.items():
        points = plan_points(profile, task)
        rows = with_frontier_gaps(rows, points)
        table = markdown_table(rows)
        tiers = tier_table(runs, task)
        if tiers:
            table += f"\nVision tier chosen per question type:\n\n{tiers}"
        (out / f"report_{task}.md").write_text(f"# {task}\n\n{table}")
        with (out / f"report_{task}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(csv_record(r) for r in rows)
        plot = plot_task(task, rows, points, out / f"report_{task}.png")
        sections.append(f"## {task}\n\n{table}\n![{task}]({plot.name})\n")
    path = out / "report.md"
    path.write_text("\n".join(sections))
    log.info("report: %d tasks -> %s", len(tables), path)
    return path


# ----------------------------------------------------------------------------------------------------
# compare: run lmms-eval per (controller, budget)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerSpec:
    name: str
    model_arg: str  # the value of model_args' `controller=`
    named: bool  # the name was given on the command line (else the report labels the run from its records)


def parse_controllers(spec: str) -> list[ControllerSpec]:
    """`static,lookup,grpo=runs/grpo/controller.json,...`: a built-in name (`lookup` / `grpo` load the model's
    artifact from `controllers/`, as `controller=lookup` does), or NAME=ARTIFACT for a controller artifact file."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in LOADERS:
            out.append(ControllerSpec(item, item, False))
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"controller {item!r}: use one of {', '.join(LOADERS)} or NAME=ARTIFACT_FILE "
                "(e.g. lookup=controllers/lookup.json)"
            )
        if not Path(path).is_file():
            raise FileNotFoundError(f"controller {name}: artifact file {path} not found")
        out.append(ControllerSpec(name, str(Path(path).resolve()), True))
    if not out:
        raise ValueError("no controllers given")
    return out


def run_name(controller: ControllerSpec, budget: float) -> str:
    return f"{controller.name}@{budget:g}"


@dataclass(frozen=True)
class EvalJob:
    controller: ControllerSpec
    budget_ms: float
    folder: Path
    tasks: tuple[str, ...]
    include_path: Path | None
    limit: int | None
    pretrained: Path | None
    model_args: str | None  # extra model_args appended verbatim (device=..., max_new_tokens=...)

    def command(self) -> list[str]:
        args = f"controller={self.controller.model_arg},budget={self.budget_ms:g}"
        if self.pretrained is not None:
            args += f",pretrained={self.pretrained}"
        if self.model_args:
            args += f",{self.model_args}"
        cmd = [sys.executable, "-m", "lmms_eval", "--model", "adaptive_molmoe", "--model_args", args,
               "--tasks", ",".join(self.tasks), "--output_path", str(self.folder)]  # fmt: skip
        if self.include_path is not None:
            cmd += ["--include_path", str(self.include_path)]
        if self.limit is not None:
            cmd += ["--limit", str(self.limit)]
        return cmd

    @property
    def log_path(self) -> Path:
        return self.folder / "lmms_eval.log"


def is_complete(folder: Path) -> bool:
    return any(folder.rglob("*_results.json")) and any((folder / RECORDS_DIR).glob("*.jsonl"))


def run_job(job: EvalJob) -> None:
    """One lmms-eval run. A folder left without results by an earlier attempt is cleared first, so the
    folder holds exactly one run's records. lmms-eval exits 0 even when the evaluation failed: the
    results file is what tells."""
    if job.folder.exists():
        shutil.rmtree(job.folder)
    job.folder.mkdir(parents=True)
    if job.controller.named:
        (job.folder / RUN_MANIFEST).write_text(json.dumps({"label": job.controller.name}))
    env = {**os.environ, **OFFLINE_ENV}
    log.info("run %s: %s", job.folder.name, " ".join(job.command()))
    with job.log_path.open("w") as log_file:
        proc = subprocess.run(
            job.command(), check=False, cwd=job.folder, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0 or not is_complete(job.folder):
        raise RuntimeError(
            f"lmms-eval run {job.folder.name} failed (exit code {proc.returncode}, results and records "
            f"{'present' if is_complete(job.folder) else 'missing'}): see {job.log_path}"
        )


def compare(
    controllers: Sequence[ControllerSpec],
    budgets: Sequence[float],
    tasks: Sequence[str],
    out: str | Path,
    include_path: str | Path | None = None,
    limit: int | None = None,
    pretrained: str | Path | None = None,
    model_args: str | None = None,
    profile: Sequence[RequestRecord] = (),
) -> Path:
    """Evaluate every (controller, budget) not evaluated yet into `out/runs/`, then write the report."""
    out = Path(out)
    include = Path(include_path).resolve() if include_path is not None else None
    checkpoint = resolve_checkpoint(pretrained).resolve() if pretrained is not None else None  # a hub id: its snapshot
    jobs = [
        EvalJob(
            c, float(b), (out / "runs" / run_name(c, b)).resolve(), tuple(tasks), include, limit, checkpoint, model_args
        )
        for c in controllers
        for b in budgets
    ]
    todo = [job for job in jobs if not is_complete(job.folder)]
    log.info("compare: %d runs, %d to evaluate, %d already done", len(jobs), len(todo), len(jobs) - len(todo))
    for job in progress(todo, desc="compare", unit="run"):
        run_job(job)
    return write_report([load_run(job.folder) for job in jobs], out, profile)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _read_profile(folder: Path | None) -> list[RequestRecord]:
    return [] if folder is None else read_profile(folder)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The report over existing runs (`compare` has its own parser, `build_compare_parser`)."""
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.report", description=__doc__.split("\n\n")[0],
                                     epilog="Subcommand: `compare` (see `python -m lmms_adaptive.tools.report compare --help`).",
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders above them")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the report (required)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile folder: plan points and oracle rows (default: none)")  # fmt: skip
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.report compare",
                                     description="Run lmms-eval per (controller, budget), then write the report.",
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument(
        "--controllers",
        required=True,
        help="comma-separated: static, lookup, grpo (the model's shipped artifacts) and/or NAME=ARTIFACT_FILE (required)",
    )
    parser.add_argument("--budgets", type=_floats, default=None,
                        help="comma-separated ms (default: 5 budgets spread over the --profile latencies)")  # fmt: skip
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names (required)")
    parser.add_argument("--include-path", type=Path, default=None,
                        help="folder of task YAMLs, e.g. tasks (default: lmms-eval's tasks only)")  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=None, help="documents per task, as lmms-eval --limit (default: all)"
    )
    parser.add_argument(
        "--pretrained", type=Path, default=None, help="checkpoint folder or hub id (default: the built-in model)"
    )
    parser.add_argument("--model-args", default=None,
                        help="extra model_args, e.g. device=cuda,max_new_tokens=16 (default: none)")  # fmt: skip
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile folder: plan points, oracle rows, default budgets (default: none)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="output folder, runs/ and the report (required)")
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if argv[:1] == ["compare"]:
        parser = build_compare_parser()
        args = parser.parse_args(argv[1:])
        profile = _read_profile(args.profile)
        if args.budgets is None and not profile:
            parser.error("give --budgets or --profile (the default budgets come from the profile's latencies)")
        try:
            controllers = parse_controllers(args.controllers)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
        budgets = args.budgets if args.budgets is not None else default_budgets(profile)
        tasks = [t for t in args.tasks.split(",") if t]
        try:
            path = compare(
                controllers,
                budgets,
                tasks,
                args.out,
                args.include_path,
                args.limit,
                args.pretrained,
                args.model_args,
                profile,
            )
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        n_runs = len(controllers) * len(budgets)
        log.info("compare: %d runs in %s, report %s; took %s", n_runs, Path(args.out) / "runs", path, took(started))
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        folders = discover_runs(args.runs)
        if not folders:
            parser.error(
                f"no run folders (with {RECORDS_DIR}/ records or *_results.json) under {', '.join(map(str, args.runs))}"
            )
        path = write_report([load_run(f) for f in folders], args.out, _read_profile(args.profile))
        log.info("report: %d runs -> %s; took %s", len(folders), path, took(started))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
