"""The lookup controller: a budget -> plan table built from profile rows, optionally request-aware.

A `LookupTable` has one entry per profiled plan: its expected task score over the profiled samples and a
statistic of its measured end-to-end latency. For a budget it picks the best-scoring plan whose latency
statistic fits. In request-aware mode a latency estimator predicts, for each plan, the latency of the
request at hand (its own prompt tokens and crops per tier), so a large image moves the choice to a
cheaper plan instead of blowing the budget. Building tables from profiles, and the oracle, are
`lmms_adaptive.tools.lookup`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from lmms_adaptive.controllers.base import ArtifactError, Controller, Model, Stage1, artifact_header
from lmms_adaptive.controllers.estimator import LatencyEstimator
from lmms_adaptive.core.plan import KnobSpace, Plan, RequestFacts

KIND = "lookup"
AGGREGATIONS = ("mean", "median", "max_accuracy")
SCORE_EPS = 1e-9  # expected scores this close count as equal (float summation noise)


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


def predicted_latencies(table: LookupTable, estimator: LatencyEstimator, facts: RequestFacts) -> list[float]:
    """Each plan's predicted total latency for this request: its prompt tokens and crops at the plan's tier,
    its images' pixels, and the plan's mean profiled output length (rounded up) capped by max_new_tokens."""
    pixels = facts.image_pixels
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

    def __init__(self, table: LookupTable, knobs: KnobSpace, estimator: LatencyEstimator | None = None) -> None:
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


def lookup_artifact(
    table: LookupTable,
    model_fingerprint: str,
    knobs: KnobSpace,
    device: str,
    estimator: LatencyEstimator | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        **artifact_header(KIND, model_fingerprint, knobs),
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


def from_artifact(artifact: Mapping[str, Any], model: Model) -> LookupController:
    """The controller of an artifact already checked by `read_artifact` (model and knob space)."""
    table = table_from_artifact(artifact)
    estimator = None
    if artifact.get("estimator") is not None:
        try:
            estimator = LatencyEstimator.from_dict(artifact["estimator"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"lookup artifact: unreadable estimator ({type(err).__name__}: {err})") from err
    try:
        return LookupController(table, model.knobs, estimator)
    except ValueError as err:
        raise ArtifactError(f"lookup artifact: {err}") from err
