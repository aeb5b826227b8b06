"""The controller interface: two decision points, and the self-describing artifact a controller loads from.

- `stage1(facts)`, before the vision encoder: sees the budget, the question and cheap request facts
  (exact prompt tokens per tier for this image, max_new_tokens) and returns a `Stage1` decision: the vision
  tier and the insertion position, plus the whole plan if it decides everything now;
- `stage2(facts, first, hidden)`, at block `insert_pos`: sees the latency token's hidden state there and
  returns the complete plan (top-k and active blocks). Only two-stage controllers implement it; their
  stage 1 returns the latency-token embedding for the runtime to insert (see `core.plan.DeferredPlan`).

An artifact is a JSON object with at least `kind`, `model_fingerprint` and `knob_space`; `read_artifact`
refuses one made for another model or knob space.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from lmms_adaptive.core.plan import DeferredPlan, KnobSpace, Plan, RequestFacts


@dataclass(frozen=True)
class Stage1:
    max_crops: int
    insert_pos: int
    plan: Plan | None = None  # set when the controller decides everything before the vision encoder
    latency_token: Tensor | None = None  # [d_model] embedding when stage 2 decides the rest


class Controller(ABC):
    kind: str
    needs_budget: bool = False  # True: every request must carry a latency budget

    @abstractmethod
    def stage1(self, facts: RequestFacts) -> Stage1: ...

    def stage2(self, facts: RequestFacts, first: Stage1, hidden: Tensor) -> Plan:
        raise NotImplementedError(f"the {self.kind} controller decides every knob at stage 1")

    def describe(self) -> dict[str, Any]:
        """What goes into each request record about the controller."""
        return {"kind": self.kind}


class Model(Protocol):
    """What a controller may read of the loaded model (`core.runtime.AdaptiveMolmoe` is one)."""

    knobs: KnobSpace
    model_id: str  # the checkpoint's fingerprint
    folder: Path | None  # the checkpoint folder (its `controllers/` holds artifacts made for it)

    def question_summary(self, question_ids: Sequence[int]) -> Tensor: ...


def stage1_decision(controller: Controller, facts: RequestFacts) -> Plan | DeferredPlan:
    """What the runtime executes for a request: the whole plan, or a DeferredPlan whose stage 2 runs at block p."""
    first = controller.stage1(facts)
    if first.plan is not None:
        return first.plan
    if first.latency_token is None:
        raise RuntimeError(f"controller {controller.kind!r} gave neither a plan nor a latency token at stage 1")
    return DeferredPlan(
        first.max_crops, first.insert_pos, first.latency_token, partial(controller.stage2, facts, first)
    )


class ArtifactError(ValueError):
    """A controller artifact that is unreadable, of an unknown kind, or made for another model."""


def knob_space_json(knobs: KnobSpace) -> dict[str, Any]:
    """The knob space as it reads back from JSON (lists, not tuples), for comparing artifacts."""
    return json.loads(json.dumps(asdict(knobs)))


def knob_space_from_json(d: Any) -> KnobSpace:
    """Inverse of `knob_space_json`; ValueError when `d` does not hold exactly the fields of KnobSpace."""
    try:
        return KnobSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (AttributeError, TypeError) as err:
        raise ValueError(f"a knob space must hold the fields of KnobSpace, got {d!r} ({err})") from err


def artifact_header(kind: str, model_fingerprint: str, knobs: KnobSpace) -> dict[str, Any]:
    """The keys every artifact starts with."""
    return {"kind": kind, "model_fingerprint": model_fingerprint, "knob_space": knob_space_json(knobs)}


def read_artifact(path: str | Path, model_fingerprint: str, knobs: KnobSpace) -> dict[str, Any]:
    """Read a controller artifact and check it belongs to this model and knob space."""
    path = Path(path)
    try:
        artifact = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"controller artifact {path}: not readable JSON ({err})") from err
    for key in ("kind", "model_fingerprint", "knob_space"):
        if key not in artifact:
            raise ArtifactError(f"controller artifact {path}: required key '{key}' is missing")
    if artifact["model_fingerprint"] != model_fingerprint:
        raise ArtifactError(
            f"controller artifact {path} was made for model {artifact['model_fingerprint']}, "
            f"but the loaded model is {model_fingerprint}: build or train one for this model"
        )
    expected = knob_space_json(knobs)
    if artifact["knob_space"] != expected:
        raise ArtifactError(
            f"controller artifact {path}: its knob space {artifact['knob_space']} differs from the model's {expected}"
        )
    return artifact
