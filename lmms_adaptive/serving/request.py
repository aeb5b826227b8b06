"""The one request path: request facts -> controller (stage 1) -> runtime (stage 2 at block p, prefill,
decode) -> record.

    served = serve(rt, controller, Request("What colour is the square?", [image], budget_ms=200))
    served.text, served.record.total_ms, served.record.plan

Every caller goes through `serve`: the lmms-eval plugin, profiling, GRPO training and evaluation, and the
benchmarks. So latency means the same everywhere: `total_ms` runs from the request's arrival, before its
facts are computed, to its last token (controller stages and preprocessing included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmms_adaptive.controllers.base import Controller, stage1_decision
from lmms_adaptive.controllers.guard import BudgetGuard
from lmms_adaptive.core.runtime import AdaptiveMolmoe, Execution, Generation, GenerationConfig, Scored
from lmms_adaptive.serving.records import RequestRecord

DEFAULT_MAX_NEW_TOKENS = 64

# Molmo's eval-style prefixes by task-name prefix; yes/no tasks use the short-answer VQA style.
TASK_STYLES = (
    ("textvqa", "text_vqa"), ("vqav2", "vqa2"), ("docvqa", "doc_qa"), ("chartqa", "chart_qa"),
    ("ai2d", "ai2_diagram"), ("scienceqa", "science_qa"), ("mme", "vqa2"), ("pope", "vqa2"),
)  # fmt: skip


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (True is an int to Python, not a number of milliseconds)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def task_style(task: str, style: str) -> str | None:
    """The prompt prefix for a request: `style=auto` picks by task name, `none` disables, else literal."""
    if style == "none":
        return None
    if style != "auto":
        return style
    return next((prefix for name, prefix in TASK_STYLES if task.startswith(name)), None)


def generation_config(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> GenerationConfig:
    """lmms-eval's generation kwargs (until, max_new_tokens, temperature, do_sample, top_p) -> GenerationConfig."""
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    return GenerationConfig(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0) if do_sample else 1.0,
        stop=tuple(until),
    )


@dataclass(frozen=True)
class Request:
    """One request as it arrives. `continuation` set: score that text after the prompt (loglikelihood)
    instead of generating. `task`, `doc_id`, `split` and `question_type` only identify the request in its record."""

    question: str
    images: Sequence[Any] = ()
    budget_ms: float | None = None
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    style: str | None = None  # the prompt prefix (`task_style`)
    continuation: str | None = None
    task: str = ""
    doc_id: int = -1
    split: str = ""
    question_type: str | None = None

    def __post_init__(self) -> None:
        budget = self.budget_ms
        if budget is not None and not (is_number(budget) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget_ms must be a finite number of milliseconds > 0, got {budget!r}")


@dataclass(frozen=True)
class Served:
    record: RequestRecord
    execution: Execution  # a Generation, or a Scored continuation

    @property
    def text(self) -> str:
        return self.record.answer

    @property
    def loglikelihood(self) -> tuple[float, bool]:
        if not isinstance(self.execution, Scored):
            raise TypeError("loglikelihood: this request generated an answer; give it a continuation to score")
        return self.execution.logprob, self.execution.greedy


def serve(rt: AdaptiveMolmoe, controller: Controller, request: Request, guard: BudgetGuard | None = None) -> Served:
    """Run one request end to end under `controller` and record it. With a `guard`, the controller plans for
    the budget scaled by the recent slowdown, and the guard then takes in this request's latency."""
    clock = rt.clock
    start = clock.now()
    slowdown = None if guard is None else guard.slowdown
    budget = request.budget_ms if guard is None else guard.budget_for(request.budget_ms)
    facts = rt.request_facts(request.question, request.images, budget, request.gen.max_new_tokens, request.task)
    decided = clock.now()
    decision = stage1_decision(controller, facts)
    stage1_ms = clock.now() - decided
    out: Generation | Scored
    if request.continuation is None:
        out = rt.generate(request.question, request.images, decision, request.gen, style=request.style)
    else:
        ids = rt.processor.encode_text(request.continuation)
        out = rt.score(request.question, request.images, ids, decision, style=request.style)
    total_ms = clock.now() - start
    t = out.timings
    generated = isinstance(out, Generation)
    record = RequestRecord(
        task=request.task,
        doc_id=request.doc_id,
        split=request.split,
        question_type=request.question_type,
        request_type="generate_until" if generated else "loglikelihood",
        controller=controller.describe(),
        budget_ms=request.budget_ms,
        slowdown=slowdown,
        plan=out.plan,
        n_prompt_tokens=out.n_prompt_tokens,
        n_image_tokens=out.n_image_tokens,
        n_text_tokens=out.n_prompt_tokens - out.n_image_tokens,
        n_crops=out.n_crops,
        image_pixels=facts.image_pixels,
        n_output_tokens=len(out.token_ids) if generated else 0,
        max_new_tokens=request.gen.max_new_tokens,
        facts_ms=decided - start,
        controller_ms=stage1_ms + t.stage2_ms,
        preprocess_ms=t.preprocess_ms,
        vision_ms=t.vision_ms,
        prefill_ms=t.prefill_ms,
        decode_ms=list(t.decode_ms),
        total_ms=total_ms,
        violated=None if request.budget_ms is None else total_ms > request.budget_ms,
        stop_reason=out.stop_reason if generated else "score",
        answer=out.text if generated else "",
        model_fingerprint=rt.model_id,
        device=rt.device_name,
        compiled=generated and rt.compiled and bool(t.decode_ms),
    )
    if guard is not None:
        n_forwards = len(record.decode_ms) + 1
        guard.observe(out.plan, out.n_crops, out.n_prompt_tokens, n_forwards, facts.image_pixels, total_ms)
    return Served(record, out)
