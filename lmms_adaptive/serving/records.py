"""The record of one served request (one JSON line each) and aggregates over records.

The same record is what the lmms-eval plugin writes per request and what a profiling sweep stores per
(sample, plan) (there `score` holds the task's own score), so lookup tables and latency estimators are
fitted on exactly what evaluation measures.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lmms_adaptive.core.plan import KNOBS, Plan

RECORD_VERSION = 4  # 4: compiled; 3: question_type, slowdown, facts_ms, n_text_tokens, image_pixels, max_new_tokens,
# answer, score, repeats
READABLE_VERSIONS = {3: {"compiled": False}, 4: {}}  # what each readable version lacks, with its value then


@dataclass(frozen=True)
class RequestRecord:
    """One request, measured end to end at batch size 1. Milliseconds; `total_ms` runs from the request's
    arrival (before its facts are computed) to its last token: facts + controller stages + preprocessing +
    vision + prefill + every decode step + what lies between them. `decode_ms[i]` is the forward that
    produced output token i+1 (the first token comes from prefill). With `repeats` > 1 every latency is the
    median over that many runs of the same request."""

    task: str
    doc_id: int
    split: str
    question_type: str | None  # the doc's `qtype` where the task has one (the synthetic suite)
    request_type: str  # "generate_until" | "loglikelihood"
    controller: dict[str, Any]  # Controller.describe()
    budget_ms: float | None
    slowdown: float | None  # the budget guard's estimate the controller's budget was divided by (None: no guard)
    plan: Plan  # as executed (a two-stage decision's completion)
    n_prompt_tokens: int
    n_image_tokens: int
    n_text_tokens: int  # prompt tokens that are not image tokens (BOS + formatted question)
    n_crops: int
    image_pixels: int  # height x width summed over the source images
    n_output_tokens: int
    max_new_tokens: int
    facts_ms: float  # computing the request facts the controller reads
    controller_ms: float  # stage 1 + stage 2
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float  # includes the latency token's row in blocks 0..p-1 and the stage-2 decision
    decode_ms: list[float]
    total_ms: float
    violated: bool | None  # None when no budget was given
    stop_reason: str  # "eos" | "stop" | "length" | "score" (loglikelihood)
    answer: str
    model_fingerprint: str
    device: str
    score: float | None = None  # the task's own score, where the caller knows it (profiling, training)
    repeats: int = 1
    compiled: bool = False  # the decode steps ran the compiled decode block (`AdaptiveMolmoe.compiled`)
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (which JSON cannot hold) raises instead of writing NaN."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        version = d.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"a request record of version {version!r}; this code reads versions {sorted(READABLE_VERSIONS)}"
            )
        d = {**d, **READABLE_VERSIONS[version], "version": RECORD_VERSION}
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
            raise ValueError(f"not a version {RECORD_VERSION} request record: missing {missing}, unknown {unknown}")
        return cls(**{**d, "plan": Plan(**d["plan"])})

    @property
    def sample(self) -> tuple[str, int]:
        return self.task, self.doc_id


class RecordWriter:
    """Appends whole JSON lines and flushes each one, so an interrupted run leaves a readable file. A file
    that ends in a torn line (a writer killed mid-line) is cut back to its last whole line first, so the
    next record does not fuse with the torn one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a+b")
        end = self._file.seek(0, 2)
        if end:
            self._file.seek(max(0, end - (1 << 20)))
            tail = self._file.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                self._file.truncate(end - len(tail) + cut + 1 if cut >= 0 else max(0, end - len(tail)))

    def write(self, record: RequestRecord) -> None:
        self._file.write((record.to_json() + "\n").encode("utf-8"))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: str | Path) -> list[RequestRecord]:
    """Records of a JSONL file; a final partial line (a run killed mid-write) is skipped."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}, line {i + 1}: not JSON") from None
        try:
            out.append(RequestRecord.from_dict(raw))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}, line {i + 1}: {err}") from err
    return out


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Latency statistics, violation rate and knob histograms of a set of records."""
    if not records:
        return {"n_requests": 0}
    total = np.array([r.total_ms for r in records], dtype=float)
    judged = [r.violated for r in records if r.violated is not None]
    return {
        "n_requests": len(records),
        "latency_mean_ms": float(total.mean()),
        "latency_p50_ms": float(np.percentile(total, 50)),
        "latency_p95_ms": float(np.percentile(total, 95)),
        "violation_rate": float(np.mean(judged)) if judged else None,
        "controller_ms_mean": float(np.mean([r.controller_ms for r in records])),
        "output_tokens_mean": float(np.mean([r.n_output_tokens for r in records])),
        "knobs": {knob: _histogram(getattr(r.plan, knob) for r in records) for knob in KNOBS},
        "plans": _histogram(r.plan.key for r in records),
    }


def _histogram(values: Iterable[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def summarize_by_task(records: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    tasks = sorted({r.task for r in records})
    return {task: summarize([r for r in records if r.task == task]) for task in tasks}
