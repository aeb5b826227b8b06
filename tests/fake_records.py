"""Request records for tests that need many of them without a model (profile rows, plugin records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmms_adaptive.core.plan import KNOBS, KnobSpace, Plan
from lmms_adaptive.serving.records import RequestRecord
from lmms_adaptive.tools.profile import ProfileStore

DEFAULTS: dict[str, Any] = {
    "task": "synth_vqa_test", "doc_id": 0, "split": "test", "question_type": None, "request_type": "generate_until",
    "controller": {"kind": "static"}, "budget_ms": None, "slowdown": None, "n_prompt_tokens": 750, "n_image_tokens": 720,
    "n_text_tokens": 30, "n_crops": 5, "image_pixels": 0, "n_output_tokens": 1, "max_new_tokens": 64,
    "facts_ms": 0.0, "controller_ms": 0.0, "preprocess_ms": 10.0, "vision_ms": 30.0, "prefill_ms": 50.0,
    "decode_ms": [], "total_ms": 90.0, "violated": None, "stop_reason": "eos", "answer": "yes",
    "model_fingerprint": "f00d", "device": "test-gpu", "score": 1.0,
}  # fmt: skip
PLAN = {"max_crops": 12, "top_k": 8, "n_blocks": 16, "insert_pos": 1, "renormalize": False}


def make_record(**fields: Any) -> RequestRecord:
    """A record with defaults for every field a test does not care about; the plan's knobs (and
    `renormalize`) may be given one by one, as keywords, or whole as `plan`."""
    knobs = {k: fields.pop(k) for k in (*KNOBS, "renormalize") if k in fields}
    plan = fields.pop("plan", None) or Plan(**{**PLAN, **knobs})
    return RequestRecord(**{**DEFAULTS, **fields, "plan": plan})


def write_profile(folder: Path, rows: list[RequestRecord], knobs: KnobSpace) -> Path:
    """A profile folder holding `rows` (all of one model), written as a sweep writes it."""
    store = ProfileStore(folder, rows[0].model_fingerprint, knobs)
    for row in rows:
        store.append(row)
    return store.compact()
