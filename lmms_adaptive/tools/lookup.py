"""Lookup tables from profile rows, and the per-sample oracle.

    python -m lmms_adaptive.tools.lookup build PROFILE_DIR --out controllers/NAME.json --latency-stat p90
    python -m lmms_adaptive.tools.lookup build PROFILE_DIR --out controllers/NAME.json --request-aware --estimator EST.json
    python -m lmms_adaptive.tools.lookup show controllers/NAME.json --budgets 50,100,200

`build_table` turns profile rows into the `controllers.lookup.LookupTable` the lookup controller picks from.
Two oracles for comparison tables: `oracle` (per sample, the best plan that fitted when measured: the upper
bound) and `type_oracle` (per question type, the plan a lookup table of that type picks: what a perfect
question classifier gets).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lmms_adaptive.controllers.estimator import LatencyEstimator
from lmms_adaptive.controllers.lookup import (
    AGGREGATIONS,
    LookupController,
    LookupTable,
    TableEntry,
    check_settings,
    choose,
    latency_statistic,
    lookup_artifact,
    table_from_artifact,
)
from lmms_adaptive.core.plan import KNOBS, KnobSpace, Plan
from lmms_adaptive.serving.records import RequestRecord
from lmms_adaptive.tools.cli import HelpFormatter, setup_logging, took
from lmms_adaptive.tools.estimator import fit_estimator
from lmms_adaptive.tools.profile import profile_knobs, read_profile

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (task, doc_id)


def plan_order(plan: Plan) -> tuple:
    return astuple(plan)


def comparison_set(samples_by_plan: Mapping[Plan, set[Sample]]) -> tuple[list[Plan], set[Sample]]:
    """The plans kept and the samples they are compared on.

    Expected scores are comparable only over the same samples, so every kept plan is scored on the
    samples all kept plans measured. Which plans to keep: for each threshold t among the plans' sample
    counts, keep the plans with at least t samples; the threshold whose (kept plans x common samples)
    is largest wins, ties to more samples. An interrupted sample-major sweep (the last sample measured
    under only some plans) thus keeps every plan and drops that sample; a few plans added later on a
    handful of samples are dropped instead of shrinking everyone's sample set.
    """
    candidates = []
    for t in sorted({len(s) for s in samples_by_plan.values()}, reverse=True):
        kept = sorted((p for p, s in samples_by_plan.items() if len(s) >= t), key=plan_order)
        common = set.intersection(*(samples_by_plan[p] for p in kept))
        candidates.append((len(kept) * len(common), len(common), kept, common))
    _, _, kept, common = max(candidates, key=lambda c: (c[0], c[1]))
    return kept, common


def build_table(
    rows: Sequence[RequestRecord], aggregation: str = "mean", latency_stat: str = "p90", tolerance: float = 0.0
) -> LookupTable:
    """One entry per plan over the comparison samples (see `comparison_set`); rows of other samples are unused."""
    check_settings(aggregation, latency_stat, tolerance)
    if not rows:
        raise ValueError("no profile rows to build a lookup table from")
    by_plan: dict[Plan, dict[Sample, RequestRecord]] = defaultdict(dict)
    for row in rows:
        by_plan[row.plan][(row.task, row.doc_id)] = row
    kept, samples = comparison_set({p: set(s) for p, s in by_plan.items()})
    if not samples:
        raise ValueError("the profiled plans share no sample: nothing to compare them on")
    dropped = tuple(sorted(set(by_plan) - set(kept), key=plan_order))
    all_samples = set().union(*(set(s) for s in by_plan.values()))
    if dropped or len(samples) < len(all_samples):
        log.warning(
            "lookup: comparing %d plans on the %d samples all of them measured; dropped %d plans (%s) and %d samples",
            len(kept), len(samples), len(dropped), ", ".join(p.key for p in dropped) or "none",
            len(all_samples) - len(samples),
        )  # fmt: skip
    order = sorted(samples)
    entries = tuple(_entry(plan, [by_plan[plan][s] for s in order], aggregation, latency_stat) for plan in kept)
    return LookupTable(entries, aggregation, latency_stat, tolerance, dropped)


def _entry(plan: Plan, rows: Sequence[RequestRecord], aggregation: str, latency_stat: str) -> TableEntry:
    scores = [r.score for r in rows]
    return TableEntry(
        plan=plan,
        score=float(np.median(scores) if aggregation == "median" else np.mean(scores)),
        latency_ms=latency_statistic([r.total_ms for r in rows], latency_stat),
        n_samples=len(rows),
        mean_prompt_tokens=float(np.mean([r.n_prompt_tokens for r in rows])),
        mean_output_tokens=float(np.mean([r.n_output_tokens for r in rows])),
        mean_crops=float(np.mean([r.n_crops for r in rows])),
    )


# ----------------------------------------------------------------------------------------------------
# The controller and its artifact
# ----------------------------------------------------------------------------------------------------


def profile_source(folder: str | Path, rows: Sequence[RequestRecord]) -> dict[str, Any]:
    """The artifact's `source`: where the rows came from, stamped with the build time (UTC)."""
    return {
        "profile": str(folder),
        "n_rows": len(rows),
        "tasks": sorted({r.task for r in rows}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleChoice:
    row: RequestRecord  # the chosen (sample, plan) measurement
    violated: bool  # its measured total_ms is over the budget


def oracle(rows: Sequence[RequestRecord], budget_ms: float | None) -> list[OracleChoice]:
    """Per sample (task, doc_id), in that order: the best-scoring row whose measured total_ms fits the
    budget (ties: lower latency, then plan order), or the fastest row, violated, when none fits.
    Each sample is judged on whatever plans it was measured with: the upper bound of any controller."""
    by_sample: dict[Sample, list[RequestRecord]] = defaultdict(list)
    for row in rows:
        by_sample[(row.task, row.doc_id)].append(row)
    out = []
    for sample in sorted(by_sample):
        options = sorted(by_sample[sample], key=lambda r: plan_order(r.plan))
        i, fits = choose([r.score for r in options], [r.total_ms for r in options], budget_ms, 0.0)
        out.append(OracleChoice(options[i], not fits))
    return out


def type_oracle(
    rows: Sequence[RequestRecord], budget_ms: float | None, latency_stat: str = "p90"
) -> list[OracleChoice]:
    """Per question type (task, question_type; one group per task without types): the plan a lookup table
    built on that type's rows picks for the budget, for each of its samples. What a perfect question
    classifier in front of per-type lookup tables gets; in (task, doc_id) order."""
    groups: dict[tuple[str, str], list[RequestRecord]] = defaultdict(list)
    for row in rows:
        groups[(row.task, row.question_type or "")].append(row)
    chosen = []
    for key in sorted(groups):
        plan = build_table(groups[key], latency_stat=latency_stat).pick(budget_ms).plan
        chosen += [r for r in groups[key] if r.plan == plan]
    over = (lambda r: False) if budget_ms is None else (lambda r: r.total_ms > budget_ms)
    return [OracleChoice(r, over(r)) for r in sorted(chosen, key=lambda r: r.sample)]


MAX_FIXED_VIOLATION = 0.02  # the share of requests over budget a user fixing one plan accepts


def best_fixed_plan(
    rows: Sequence[RequestRecord], budget_ms: float | None, max_violation: float = MAX_FIXED_VIOLATION
) -> list[OracleChoice]:
    """Per task: the one plan it is best to fix in advance for the budget, judged on these very samples. Among the
    plans whose share of measured total_ms over the budget is at most `max_violation`, the best-scoring (ties:
    lower mean latency, then plan order); when none is, the plan with the fewest violations (ties: the faster).
    Plans are compared on the samples all of them measured (`comparison_set`). Its rows, in (task, doc_id) order."""
    chosen = []
    for task in sorted({r.task for r in rows}):
        by_plan: dict[Plan, dict[Sample, RequestRecord]] = defaultdict(dict)
        for row in rows:
            if row.task == task:
                by_plan[row.plan][row.sample] = row
        kept, samples = comparison_set({p: set(s) for p, s in by_plan.items()})
        options = []
        for plan in kept:
            plan_rows = [by_plan[plan][s] for s in sorted(samples)]
            rate = 0.0 if budget_ms is None else float(np.mean([r.total_ms > budget_ms for r in plan_rows]))
            score, latency = np.mean([r.score for r in plan_rows]), np.mean([r.total_ms for r in plan_rows])
            excess = rate if rate > max_violation else 0.0  # every plan within the limit ranks on score alone
            options.append((excess, 0.0 if excess else -score, latency, plan_order(plan), plan_rows))
        chosen += min(options, key=lambda o: o[:4])[4]
    over = (lambda r: False) if budget_ms is None else (lambda r: r.total_ms > budget_ms)
    return [OracleChoice(r, over(r)) for r in chosen]


ORACLES = {"oracle": oracle, "oracle per question type": type_oracle, "best fixed plan": best_fixed_plan}


@dataclass(frozen=True)
class OracleSummary:
    name: str  # a key of ORACLES
    task: str
    budget_ms: float | None
    n_samples: int
    score: float  # mean over samples
    latency_mean_ms: float
    latency_p95_ms: float
    violation_rate: float
    knobs: dict[str, float]  # mean max_crops, top_k, n_blocks, insert_pos of the chosen plans


def oracle_summary(rows: Sequence[RequestRecord], budgets: Sequence[float | None]) -> list[OracleSummary]:
    """Each oracle (ORACLES order) per task (sorted) and budget (in the order given)."""
    out = []
    for name, pick in ORACLES.items():
        for task in sorted({r.task for r in rows}):
            task_rows = [r for r in rows if r.task == task]
            for budget in budgets:
                chosen = pick(task_rows, budget)
                total = [c.row.total_ms for c in chosen]
                out.append(
                    OracleSummary(
                        name=name,
                        task=task,
                        budget_ms=budget,
                        n_samples=len(chosen),
                        score=float(np.mean([c.row.score for c in chosen])),
                        latency_mean_ms=float(np.mean(total)),
                        latency_p95_ms=float(np.percentile(total, 95)),
                        violation_rate=float(np.mean([c.violated for c in chosen])),
                        knobs={k: float(np.mean([getattr(c.row.plan, k) for c in chosen])) for k in KNOBS},
                    )
                )
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def single_value(rows: Sequence[RequestRecord], field: str, what: str) -> str:
    """The one value of `field` all rows share; a table mixing models or devices is refused."""
    values = sorted({getattr(r, field) for r in rows})
    if len(values) != 1:
        raise ValueError(f"the profile rows come from {len(values)} {what}s ({', '.join(values)}): build one table per {what} "
                         "(separate profile folders, or --task)")  # fmt: skip
    return values[0]


def _load_estimator(
    path: Path | None, rows: Sequence[RequestRecord], knobs: KnobSpace, model: str, device: str
) -> LatencyEstimator:
    """The estimator file (refused when fitted on another model or device), or one fitted on `rows`."""
    if path is None:
        log.info("lookup: no --estimator given: fitting one on the %d profile rows", len(rows))
        return fit_estimator(rows, knobs)
    estimator = LatencyEstimator.load(path)
    if (estimator.model_fingerprint, estimator.device) != (model, device):
        raise ValueError(f"--estimator {path} was fitted on model {estimator.model_fingerprint} ({estimator.device}), "
                         f"the profile rows on model {model} ({device})")  # fmt: skip
    return estimator


def build(args: argparse.Namespace) -> Path:
    rows = read_profile(args.profile)
    if args.task:
        wanted = set(args.task)
        rows = [r for r in rows if r.task in wanted]
        if not rows:
            raise ValueError(f"no profile rows of task(s) {', '.join(args.task)} in {args.profile}")
    model = single_value(rows, "model_fingerprint", "model")
    device = single_value(rows, "device", "device")
    knobs = profile_knobs(args.profile)
    table = build_table(rows, args.aggregation, args.latency_stat, args.tolerance)
    estimator = _load_estimator(args.estimator, rows, knobs, model, device) if args.request_aware else None
    LookupController(table, knobs, estimator)  # the artifact must load: plans valid for this model
    artifact = lookup_artifact(table, model, knobs, device, estimator, profile_source(args.profile, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(artifact, indent=2) + "\n")
    log.info("lookup: %d plans on %d samples -> %s", len(table.entries), table.entries[0].n_samples, args.out)
    return args.out


def show(args: argparse.Namespace) -> str:
    """A budget -> plan listing of an artifact (table mode: request-aware picks depend on each request)."""
    artifact = json.loads(args.artifact.read_text())
    table = table_from_artifact(artifact)
    mode = artifact["settings"].get("mode", "table")
    header = (
        f"{args.artifact}: model {artifact.get('model_fingerprint', '?')} on {artifact.get('device', '?')}, {len(table.entries)} plans "
        f"on {table.entries[0].n_samples} samples, aggregation {table.aggregation}, latency {table.latency_stat}, "
        f"tolerance {table.tolerance:g}, mode {mode}"
    )
    lines = [header]
    if mode == "request_aware":
        lines.append("request-aware: each request is judged on its predicted latency; below, the measured statistic")
    lines.append(f"{'budget_ms':>10}  {'plan':<22} {'score':>7} {'latency_ms':>11}  fits")
    for budget in args.budgets:
        c = table.pick(budget)
        lines.append(f"{budget:>10g}  {c.plan.key:<22} {c.expected_score:>7.4f} {c.expected_latency_ms:>11.2f}  "
                     f"{'yes' if c.fits else 'NO (cheapest)'}")  # fmt: skip
    return "\n".join(lines)


def _budgets(spec: str) -> list[float]:
    try:
        return [float(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets must be comma-separated milliseconds, e.g. 50,100,200; got {spec!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.lookup", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, help="what to do (see COMMAND --help)")
    b = sub.add_parser(
        "build",
        help="build a lookup controller artifact from a profile folder",
        description=inspect.cleandoc(LookupTable.__doc__ or ""),
        epilog=inspect.cleandoc(comparison_set.__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=HelpFormatter,
    )
    b.add_argument(
        "profile", type=Path, metavar="PROFILE_DIR", help="profile folder of `python -m lmms_adaptive.tools.profile`"
    )
    b.add_argument(
        "--out", type=Path, required=True, help="artifact to write, e.g. controllers/textvqa_h100.json (required)"
    )
    b.add_argument("--aggregation", choices=AGGREGATIONS, default="mean", help="per-plan expected score and pick rule")
    b.add_argument(
        "--latency-stat",
        default="p90",
        help="statistic of a plan's measured total_ms compared with the budget: mean or pN",
    )
    b.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="accept plans scoring within this of the best fitting one, then take the fastest",
    )
    b.add_argument(
        "--request-aware",
        action="store_true",
        help="judge each request on its own predicted latency (needs an estimator)",
    )
    b.add_argument(
        "--estimator",
        type=Path,
        default=None,
        help="latency estimator JSON for --request-aware (default: fit one on the profile rows)",
    )
    b.add_argument("--task", nargs="+", action="extend", default=[], help="use only rows of these tasks (default: all)")
    s = sub.add_parser("show", help="print the plan an artifact chooses per budget", formatter_class=HelpFormatter)
    s.add_argument("artifact", type=Path, metavar="ARTIFACT", help="lookup controller artifact written by `build`")
    s.add_argument(
        "--budgets", type=_budgets, required=True, help="comma-separated budgets in ms, e.g. 50,100,200 (required)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    setup_logging()
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "build" and args.estimator is not None and not args.request_aware:
        p.error("--estimator only applies with --request-aware")
    try:
        if args.command == "build":
            path = build(args)
            log.info("lookup build: wrote %s; took %s", path, took(started))
            print(path)
        else:
            print(show(args))
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
