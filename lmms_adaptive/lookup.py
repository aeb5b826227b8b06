"""The lookup controller: a budget -> plan table built from profile rows, and the per-sample oracle.

    python -m lmms_adaptive.lookup build PROFILE_DIR --out controllers/NAME.json --latency-stat p90
    python -m lmms_adaptive.lookup build PROFILE_DIR --out controllers/NAME.json --request-aware --estimator EST.json
    python -m lmms_adaptive.lookup show controllers/NAME.json --budgets 50,100,200

A `LookupTable` has one entry per profiled plan: its expected task score over the profiled samples and a
statistic of its measured end-to-end latency. For a budget it picks the best-scoring plan whose latency
statistic fits. In request-aware mode a latency estimator predicts, for each plan, the latency of the
request at hand (its own prompt tokens and crops per tier), so a large image moves the choice to a
cheaper plan instead of blowing the budget.

`oracle` is the upper bound for comparison tables: per sample, the best plan that fitted when measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from .controllers import ArtifactError, Controller, RequestFacts, Stage1, knob_space_json
from .plan import KnobSpace, Plan
from .records import ProfileRow, plan_key

log = logging.getLogger(__name__)

KIND = "lookup"
AGGREGATIONS = ("mean", "median", "max_accuracy")
SCORE_EPS = 1e-9  # expected scores this close count as equal (float summation noise)
KNOB_NAMES = ("max_crops", "top_k", "n_blocks", "insert_pos")

Sample = tuple[str, int]  # (task, doc_id)


# ----------------------------------------------------------------------------------------------------
# Estimator interface (lmms_adaptive.estimator.LatencyEstimator, or a stand-in with the same methods)
# ----------------------------------------------------------------------------------------------------


class _Prediction(Protocol):
    total_ms: float


class LatencyModel(Protocol):
    def predict(
        self, plan: Plan, n_crops: int, n_prompt_tokens: int, n_output_tokens: int, *, image_pixels: int
    ) -> _Prediction: ...

    def to_dict(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableEntry:
    """One plan's statistics over the table's comparison samples."""

    plan: Plan
    score: float  # expected task score, per the table's aggregation
    latency_ms: float  # the table's latency statistic of the measured total_ms
    n_samples: int
    mean_prompt_tokens: float
    mean_output_tokens: float
    mean_crops: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "score": self.score,
            "latency_ms": self.latency_ms,
            "n_samples": self.n_samples,
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "mean_output_tokens": self.mean_output_tokens,
            "mean_crops": self.mean_crops,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableEntry:
        return cls(Plan(**d["plan"]), **{k: v for k, v in d.items() if k != "plan"})


class Choice(NamedTuple):
    plan: Plan
    expected_score: float
    expected_latency_ms: float
    fits: bool  # False: nothing fitted the budget and this is the cheapest plan


@dataclass(frozen=True)
class LookupTable:
    """Plans with expected score and latency, and the rule that picks one for a budget.

    Aggregations (how a plan's per-sample scores become its expected score, and how the pick uses it):
    - "mean": the mean score. Pick: among plans that fit, those within `tolerance` of the best expected
      score, and of those the fastest;
    - "median": the median score (coarse for 0/1 scores; meant for graded ones such as ANLS), same pick;
    - "max_accuracy": the mean score, picked strictly: the best expected score, ties to the fastest.
      `tolerance` must be 0 (it is the choice "mean" makes with tolerance 0, named for the CLI and artifacts).
    Remaining ties go to the lower latency, then to the earlier entry (entries are in plan order:
    max_crops, top_k, n_blocks, insert_pos, renormalize ascending). Without a budget every plan fits;
    when none fits, the fastest plan is returned with `fits` False.
    """

    entries: tuple[TableEntry, ...]
    aggregation: str
    latency_stat: str
    tolerance: float = 0.0
    dropped_plans: tuple[Plan, ...] = ()  # profiled on too few of the comparison samples (see `comparison_set`)

    def __post_init__(self) -> None:
        check_settings(self.aggregation, self.latency_stat, self.tolerance)
        if not self.entries:
            raise ValueError("a lookup table needs at least one plan")

    def pick(self, budget_ms: float | None) -> Choice:
        return self.pick_with([e.latency_ms for e in self.entries], budget_ms)

    def pick_with(self, latencies_ms: Sequence[float], budget_ms: float | None) -> Choice:
        """The pick when each entry costs `latencies_ms[i]` (the table's own, or predicted for one request)."""
        i, fits = choose([e.score for e in self.entries], latencies_ms, budget_ms, self.tolerance)
        return Choice(self.entries[i].plan, self.entries[i].score, float(latencies_ms[i]), fits)


def check_settings(aggregation: str, latency_stat: str, tolerance: float) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    percentile_of(latency_stat)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if aggregation == "max_accuracy" and tolerance > 0:
        raise ValueError(
            "aggregation max_accuracy picks the best score strictly: use aggregation mean with a tolerance"
        )


def percentile_of(latency_stat: str) -> float | None:
    """'mean' -> None; 'p90' -> 90.0 (any percentile 0..100)."""
    if latency_stat == "mean":
        return None
    try:
        q = float(latency_stat[1:]) if latency_stat.startswith("p") else math.nan
    except ValueError:
        q = math.nan
    if not 0 <= q <= 100:
        raise ValueError(
            f"latency statistic must be 'mean' or a percentile p0..p100 (e.g. p50, p90, p95), got {latency_stat!r}"
        )
    return q


def latency_statistic(values_ms: Sequence[float], latency_stat: str) -> float:
    q = percentile_of(latency_stat)
    return float(np.mean(values_ms)) if q is None else float(np.percentile(values_ms, q))


def choose(
    scores: Sequence[float], latencies_ms: Sequence[float], budget_ms: float | None, tolerance: float
) -> tuple[int, bool]:
    """Index of the chosen option and whether it fits.

    No budget: every option fits. Otherwise an option fits when its latency <= budget. Among the fitting
    ones, those scoring within `tolerance` of the best are accepted and the fastest accepted one wins
    (then the lowest index). Nothing fits: the fastest option (then the lowest index), with fits False.
    """
    indices = range(len(scores))
    fitting = [i for i in indices if budget_ms is None or latencies_ms[i] <= budget_ms]
    if not fitting:
        return min(indices, key=lambda i: (latencies_ms[i], i)), False
    best = max(scores[i] for i in fitting)
    accepted = [i for i in fitting if scores[i] >= best - tolerance - SCORE_EPS]
    return min(accepted, key=lambda i: (latencies_ms[i], i)), True


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
    rows: Sequence[ProfileRow], aggregation: str = "mean", latency_stat: str = "p90", tolerance: float = 0.0
) -> LookupTable:
    """One entry per plan over the comparison samples (see `comparison_set`); rows of other samples are unused."""
    check_settings(aggregation, latency_stat, tolerance)
    if not rows:
        raise ValueError("no profile rows to build a lookup table from")
    by_plan: dict[Plan, dict[Sample, ProfileRow]] = defaultdict(dict)
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
            len(kept), len(samples), len(dropped), ", ".join(plan_key(p.to_dict()) for p in dropped) or "none",
            len(all_samples) - len(samples),
        )  # fmt: skip
    order = sorted(samples)
    entries = tuple(_entry(plan, [by_plan[plan][s] for s in order], aggregation, latency_stat) for plan in kept)
    return LookupTable(entries, aggregation, latency_stat, tolerance, dropped)


def _entry(plan: Plan, rows: Sequence[ProfileRow], aggregation: str, latency_stat: str) -> TableEntry:
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


def predicted_latencies(table: LookupTable, estimator: LatencyModel, facts: RequestFacts) -> list[float]:
    """Each plan's predicted total latency for this request: its prompt tokens and crops at the plan's tier,
    its images' pixels, and the plan's mean profiled output length (rounded up) capped by max_new_tokens."""
    pixels = sum(h * w for h, w in facts.image_sizes)
    out = []
    for e in table.entries:
        tier = e.plan.max_crops
        if tier not in facts.prompt_tokens_per_tier or tier not in facts.crops_per_tier:
            raise ValueError(
                f"request facts have no prompt tokens / crops for tier max_crops={tier} (have {sorted(facts.crops_per_tier)})"
            )
        n_out = min(math.ceil(e.mean_output_tokens), facts.max_new_tokens)
        crops, prompt = facts.crops_per_tier[tier], facts.prompt_tokens_per_tier[tier]
        out.append(estimator.predict(e.plan, crops, prompt, n_out, image_pixels=pixels).total_ms)
    return out


class LookupController(Controller):
    """Picks a plan from a `LookupTable` for `facts.budget_ms`.

    Table mode compares the budget with each plan's measured latency statistic. Request-aware mode
    (with an estimator) compares it with each plan's predicted latency for this request instead; the
    table's latency statistic then only describes the profile. Without a budget both modes pick from the
    table alone (nothing to predict against).
    """

    kind = KIND

    def __init__(self, table: LookupTable, knobs: KnobSpace, estimator: LatencyModel | None = None) -> None:
        for e in table.entries:
            knobs.validate(e.plan)
            if estimator is not None and e.plan.max_crops not in knobs.tiers:
                raise ValueError(
                    f"request-aware lookup needs every plan at a tier {list(knobs.tiers)}, got max_crops={e.plan.max_crops}"
                )
        self.table = table
        self.estimator = estimator

    @property
    def mode(self) -> str:
        return "table" if self.estimator is None else "request_aware"

    def choose(self, facts: RequestFacts) -> Choice:
        if self.estimator is None or facts.budget_ms is None:
            return self.table.pick(facts.budget_ms)
        return self.table.pick_with(predicted_latencies(self.table, self.estimator, facts), facts.budget_ms)

    def stage1(self, facts: RequestFacts) -> Stage1:
        plan = self.choose(facts).plan
        return Stage1(plan.max_crops, plan.insert_pos, plan)

    def describe(self) -> dict[str, Any]:
        t = self.table
        return {"kind": self.kind, "mode": self.mode, "aggregation": t.aggregation, "latency_stat": t.latency_stat,
                "tolerance": t.tolerance, "n_plans": len(t.entries)}  # fmt: skip


def profile_source(folder: str | Path, rows: Sequence[ProfileRow]) -> dict[str, Any]:
    """The artifact's `source`: where the rows came from, stamped with the build time (UTC)."""
    return {
        "profile": str(folder),
        "n_rows": len(rows),
        "tasks": sorted({r.task for r in rows}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def lookup_artifact(
    table: LookupTable,
    model_fingerprint: str,
    knobs: KnobSpace,
    device: str,
    estimator: LatencyModel | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "kind": KIND,
        "model_fingerprint": model_fingerprint,
        "knob_space": knob_space_json(knobs),
        "device": device,
        "settings": {
            "mode": "table" if estimator is None else "request_aware",
            "aggregation": table.aggregation,
            "latency_stat": table.latency_stat,
            "tolerance": table.tolerance,
        },
        "entries": [e.to_dict() for e in table.entries],
        "dropped_plans": [p.to_dict() for p in table.dropped_plans],
        "estimator": None if estimator is None else estimator.to_dict(),
        "source": dict(source or {}),
    }


def table_from_artifact(artifact: Mapping[str, Any]) -> LookupTable:
    if artifact.get("kind") != KIND:
        raise ArtifactError(f"expected a controller artifact of kind {KIND!r}, got {artifact.get('kind')!r}")
    try:
        settings = artifact["settings"]
        return LookupTable(
            entries=tuple(TableEntry.from_dict(e) for e in artifact["entries"]),
            aggregation=settings["aggregation"],
            latency_stat=settings["latency_stat"],
            tolerance=settings["tolerance"],
            dropped_plans=tuple(Plan(**p) for p in artifact.get("dropped_plans", [])),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"lookup artifact: malformed table ({type(err).__name__}: {err})") from err


def lookup_from_artifact(artifact: Mapping[str, Any], knobs: KnobSpace) -> LookupController:
    """The controller of an artifact already checked by `read_artifact` (model and knob space)."""
    table = table_from_artifact(artifact)
    estimator = None
    if artifact.get("estimator") is not None:
        from .estimator import LatencyEstimator

        try:
            estimator = LatencyEstimator.from_dict(artifact["estimator"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"lookup artifact: unreadable estimator ({type(err).__name__}: {err})") from err
    try:
        return LookupController(table, knobs, estimator)
    except ValueError as err:
        raise ArtifactError(f"lookup artifact: {err}") from err


# ----------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleChoice:
    row: ProfileRow  # the chosen (sample, plan) measurement
    violated: bool  # no plan of this sample fitted the budget; `row` is its fastest


def oracle(rows: Sequence[ProfileRow], budget_ms: float | None) -> list[OracleChoice]:
    """Per sample (task, doc_id), in that order: the best-scoring row whose measured total_ms fits the
    budget (ties: lower latency, then plan order), or the fastest row, violated, when none fits.
    Each sample is judged on whatever plans it was measured with."""
    by_sample: dict[Sample, list[ProfileRow]] = defaultdict(list)
    for row in rows:
        by_sample[(row.task, row.doc_id)].append(row)
    out = []
    for sample in sorted(by_sample):
        options = sorted(by_sample[sample], key=lambda r: plan_order(r.plan))
        i, fits = choose([r.score for r in options], [r.total_ms for r in options], budget_ms, 0.0)
        out.append(OracleChoice(options[i], not fits))
    return out


@dataclass(frozen=True)
class OracleSummary:
    task: str
    budget_ms: float | None
    n_samples: int
    score: float  # mean over samples
    latency_mean_ms: float
    latency_p95_ms: float
    violation_rate: float
    knobs: dict[str, float]  # mean max_crops, top_k, n_blocks, insert_pos of the chosen plans


def oracle_summary(rows: Sequence[ProfileRow], budgets: Sequence[float | None]) -> list[OracleSummary]:
    """The oracle per task (sorted) and budget (in the order given)."""
    out = []
    for task in sorted({r.task for r in rows}):
        task_rows = [r for r in rows if r.task == task]
        for budget in budgets:
            chosen = oracle(task_rows, budget)
            total = [c.row.total_ms for c in chosen]
            out.append(
                OracleSummary(
                    task=task,
                    budget_ms=budget,
                    n_samples=len(chosen),
                    score=float(np.mean([c.row.score for c in chosen])),
                    latency_mean_ms=float(np.mean(total)),
                    latency_p95_ms=float(np.percentile(total, 95)),
                    violation_rate=float(np.mean([c.violated for c in chosen])),
                    knobs={k: float(np.mean([getattr(c.row, k) for c in chosen])) for k in KNOB_NAMES},
                )
            )
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def single_value(rows: Sequence[ProfileRow], field: str, what: str) -> str:
    """The one value of `field` all rows share; a table mixing models or devices is refused."""
    values = sorted({getattr(r, field) for r in rows})
    if len(values) != 1:
        raise ValueError(f"the profile rows come from {len(values)} {what}s ({', '.join(values)}): build one table per {what} "
                         "(separate profile folders, or --task)")  # fmt: skip
    return values[0]


def _load_estimator(path: Path | None, rows: Sequence[ProfileRow], model: str, device: str) -> LatencyModel:
    """The estimator file (refused when fitted on another model or device), or one fitted on `rows`."""
    from .estimator import LatencyEstimator

    if path is None:
        log.info("lookup: no --estimator given: fitting one on the %d profile rows", len(rows))
        return LatencyEstimator.fit(rows)
    estimator = LatencyEstimator.from_dict(json.loads(path.read_text()))
    if (estimator.model_fingerprint, estimator.device) != (model, device):
        raise ValueError(f"--estimator {path} was fitted on model {estimator.model_fingerprint} ({estimator.device}), "
                         f"the profile rows on model {model} ({device})")  # fmt: skip
    return estimator


def build(args: argparse.Namespace) -> Path:
    from .checkpoint import fingerprint
    from .config import MolmoeConfig
    from .profile import read_profile
    from .tiny import default_checkpoint

    rows = read_profile(args.profile)
    if args.task:
        wanted = set(args.task)
        rows = [r for r in rows if r.task in wanted]
        if not rows:
            raise ValueError(f"no profile rows of task(s) {', '.join(args.task)} in {args.profile}")
    model = single_value(rows, "model_fingerprint", "model")
    device = single_value(rows, "device", "device")
    checkpoint = args.pretrained or default_checkpoint()
    if (found := fingerprint(checkpoint)) != model:
        raise ValueError(f"the profile rows were measured on model {model}, but --pretrained {checkpoint} is model {found}: "
                         "pass the checkpoint the profile was made with")  # fmt: skip
    knobs = KnobSpace.from_config(MolmoeConfig.from_folder(checkpoint))
    table = build_table(rows, args.aggregation, args.latency_stat, args.tolerance)
    estimator = _load_estimator(args.estimator, rows, model, device) if args.request_aware else None
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
        lines.append(f"{budget:>10g}  {plan_key(c.plan.to_dict()):<22} {c.expected_score:>7.4f} {c.expected_latency_ms:>11.2f}  "
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
    p = argparse.ArgumentParser(prog="python -m lmms_adaptive.lookup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build",
        help="build a lookup controller artifact from a profile folder",
        description=inspect.cleandoc(LookupTable.__doc__ or ""),
        epilog=inspect.cleandoc(comparison_set.__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "profile", type=Path, metavar="PROFILE_DIR", help="profile folder of `python -m lmms_adaptive.profile`"
    )
    b.add_argument("--out", type=Path, required=True, help="artifact to write, e.g. controllers/textvqa_h100.json")
    b.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="mean",
        help="per-plan expected score and pick rule (default mean)",
    )
    b.add_argument(
        "--latency-stat",
        default="p90",
        help="statistic of a plan's measured total_ms compared with the budget: mean or pN (default p90)",
    )
    b.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="accept plans scoring within this of the best fitting one, then take the fastest (default 0)",
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
    b.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="the profiled checkpoint, for its knob space (default: the built-in tiny model)",
    )
    s = sub.add_parser("show", help="print the plan an artifact chooses per budget")
    s.add_argument("artifact", type=Path, metavar="ARTIFACT")
    s.add_argument("--budgets", type=_budgets, required=True, help="comma-separated budgets in ms, e.g. 50,100,200")
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "build" and args.estimator is not None and not args.request_aware:
        p.error("--estimator only applies with --request-aware")
    try:
        print(build(args) if args.command == "build" else show(args))
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
