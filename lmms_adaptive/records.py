"""Per-request latency records (one JSON line each) and their aggregates."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .plan import Plan

RECORD_VERSION = 2


@dataclass(frozen=True)
class RequestRecord:
    task: str
    doc_id: int
    split: str
    request_type: str  # "generate_until" | "loglikelihood"
    controller: dict[str, Any]
    budget_ms: float | None
    plan: dict[str, Any]
    n_prompt_tokens: int
    n_image_tokens: int
    n_crops: int
    n_output_tokens: int
    controller_ms: float
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: list[float]
    total_ms: float  # end to end: controller + preprocessing + vision + prefill + decode
    violated: bool | None  # None when no budget was given
    stop_reason: str
    model_fingerprint: str
    device: str
    version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class RecordWriter:
    """Appends whole JSON lines and flushes each one, so an interrupted run leaves a readable file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: RequestRecord) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a final partial line (a run killed mid-write) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plan_key(plan: dict[str, Any]) -> str:
    return f"crops{plan['max_crops']}_k{plan['top_k']}_b{plan['n_blocks']}_p{plan['insert_pos']}"


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Latency statistics, violation rate and knob histograms of a set of records."""
    if not records:
        return {"n_requests": 0}
    total = np.array([r["total_ms"] for r in records], dtype=float)
    judged = [r["violated"] for r in records if r["violated"] is not None]
    return {
        "n_requests": len(records),
        "latency_mean_ms": float(total.mean()),
        "latency_p50_ms": float(np.percentile(total, 50)),
        "latency_p95_ms": float(np.percentile(total, 95)),
        "violation_rate": float(np.mean(judged)) if judged else None,
        "controller_ms_mean": float(np.mean([r["controller_ms"] for r in records])),
        "output_tokens_mean": float(np.mean([r["n_output_tokens"] for r in records])),
        "knobs": {
            knob: _histogram(r["plan"][knob] for r in records) for knob in ("max_crops", "top_k", "n_blocks", "insert_pos")
        },
        "plans": _histogram(plan_key(r["plan"]) for r in records),
    }


def _histogram(values: Iterable[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def summarize_by_task(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    tasks = sorted({r["task"] for r in records})
    return {task: summarize([r for r in records if r["task"] == task]) for task in tasks}


# ----------------------------------------------------------------------------------------------------
# Profile rows: one measured (sample, plan) pair of a profiling sweep
# ----------------------------------------------------------------------------------------------------

PROFILE_VERSION = 1


@dataclass(frozen=True)
class ProfileRow:
    """One (sample, plan) of `python -m lmms_adaptive.profile`: tokens, stage latencies and the task's score.

    `score` is the task's own `process_results` value for the sample's primary metric (VQA accuracy,
    a POPE / MME 0-1 correctness, ...). Latencies are milliseconds at batch size 1 after warm-up;
    `decode_ms[i]` is the forward that produced output token i+1 (the first token comes from prefill).
    """

    task: str
    doc_id: int
    split: str
    max_crops: int
    top_k: int
    n_blocks: int
    insert_pos: int
    renormalize: bool
    n_crops: int
    n_image_tokens: int
    n_text_tokens: int  # prompt tokens that are not image tokens (BOS + formatted question)
    n_prompt_tokens: int  # n_image_tokens + n_text_tokens
    n_output_tokens: int
    max_new_tokens: int
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: list[float]
    total_ms: float
    score: float
    answer: str
    stop_reason: str
    device: str
    model_fingerprint: str
    repeats: int = 1  # runs measured; each latency is their median
    image_pixels: int = 0  # height x width summed over the source images (what resizing them costs)
    version: int = PROFILE_VERSION

    @property
    def plan(self) -> Plan:
        return Plan(self.max_crops, self.top_k, self.n_blocks, self.insert_pos, self.renormalize)

    @property
    def key(self) -> tuple[str, int, str]:
        """(task, doc_id, plan key): what makes a row unique in a sweep."""
        return self.task, self.doc_id, plan_key(self.plan.to_dict())
