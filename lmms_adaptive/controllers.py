"""Controllers: per-request knob selection under a latency budget.

The interface has the two decision points of the design:
- `stage1(facts)`, before the vision encoder: sees the budget, the question and cheap request facts
  (exact prompt tokens per tier for this image, max_new_tokens) and returns a `Stage1` decision:
  the vision tier and the insertion position, plus the whole plan if it decides everything now;
- `stage2(facts, first, hidden)`, at block `insert_pos`: sees the latency token's hidden state there
  and returns the complete plan (top-k and active blocks). Only two-stage controllers implement it; their
  stage 1 returns the latency-token embedding for the runtime to insert (see `plan.DeferredPlan`).

`static` and `lookup` decide everything at stage 1, `grpo` (`policy.GRPOController`) uses both.
Controller artifacts are self-describing JSON files (`kind`, `model_fingerprint`, `knob_space`, ...) and
refuse to load for another model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor

from .plan import DeferredPlan, KnobSpace, Plan

BUILTIN_CONTROLLERS = ("static", "lookup", "grpo")


@dataclass(frozen=True)
class RequestFacts:
    """What a controller may know before the vision encoder runs (all cheap to compute)."""

    budget_ms: float | None
    question: str
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) per image
    prompt_tokens_per_tier: dict[int, int]  # max_crops -> exact prompt length with the images at that tier
    crops_per_tier: dict[int, int]  # max_crops -> ViT crops of all images at that tier (the vision cost)
    text_tokens: int
    max_new_tokens: int
    task: str | None = None
    question_ids: tuple[int, ...] = ()  # the question's token ids under the model's tokenizer


@dataclass(frozen=True)
class Stage1:
    max_crops: int
    insert_pos: int
    plan: Plan | None = None  # set when the controller decides everything before the vision encoder
    latency_token: Tensor | None = None  # [d_model] embedding when stage 2 decides the rest


class Controller(ABC):
    kind: str

    @abstractmethod
    def stage1(self, facts: RequestFacts) -> Stage1: ...

    def stage2(self, facts: RequestFacts, first: Stage1, hidden: Tensor) -> Plan:
        raise NotImplementedError(f"the {self.kind} controller decides every knob at stage 1")

    def describe(self) -> dict[str, Any]:
        """What goes into each request record about the controller."""
        return {"kind": self.kind}


class StaticController(Controller):
    """The same plan for every request, whatever the budget."""

    kind = "static"

    def __init__(self, plan: Plan, knobs: KnobSpace) -> None:
        knobs.validate(plan)
        self.plan = plan

    def stage1(self, facts: RequestFacts) -> Stage1:
        return Stage1(self.plan.max_crops, self.plan.insert_pos, self.plan)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "plan": self.plan.to_dict()}


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


# Shipped controller artifacts (`controllers/` of a source checkout, i.e. an editable install).
REPO_ARTIFACTS = Path(__file__).resolve().parents[1] / "controllers"


def find_artifact(kind: str, model_fingerprint: str, folders: list[Path]) -> Path | None:
    """The first `*.json` artifact of `kind` made for this model in `folders` (in order, files sorted by name)."""
    for folder in folders:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            try:
                head = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (
                isinstance(head, dict)
                and head.get("kind") == kind
                and head.get("model_fingerprint") == model_fingerprint
            ):
                return path
    return None


def knob_space_json(knobs: KnobSpace) -> dict[str, Any]:
    """The knob space as it reads back from JSON (lists, not tuples), for comparing artifacts."""
    return json.loads(json.dumps(asdict(knobs)))


def static_artifact(plan: Plan, model_fingerprint: str, knobs: KnobSpace) -> dict[str, Any]:
    return {
        "kind": "static",
        "model_fingerprint": model_fingerprint,
        "knob_space": knob_space_json(knobs),
        "plan": plan.to_dict(),
    }


def load_controller(
    artifact: dict[str, Any], knobs: KnobSpace, question_summary: Callable[[Sequence[int]], Tensor] | None = None
) -> Controller:
    """The controller of a (checked) artifact. `question_summary` (the model's question token ids -> mean
    token embedding) is what a grpo policy's stage 1 reads."""
    kind = artifact["kind"]
    if kind == "static":
        return StaticController(Plan(**artifact["plan"]), knobs)
    if kind == "lookup":
        from .lookup import lookup_from_artifact  # lazy: lookup imports this module

        return lookup_from_artifact(artifact, knobs)
    if kind == "grpo":
        from .policy import GRPOController, TwoStagePolicy  # lazy: policy imports this module

        if question_summary is None:
            raise ValueError("a grpo controller needs the model's question_summary")
        return GRPOController(TwoStagePolicy.from_artifact(artifact, knobs), question_summary)
    raise ArtifactError(
        f"controller artifact of kind {kind!r} is not supported by this version (known: {', '.join(BUILTIN_CONTROLLERS)})"
    )
