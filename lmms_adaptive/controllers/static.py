"""The static controller: the same plan for every request, whatever the budget."""

from __future__ import annotations

from typing import Any

from lmms_adaptive.controllers.base import ArtifactError, Controller, Model, Stage1, artifact_header
from lmms_adaptive.core.plan import KnobSpace, Plan, RequestFacts


class StaticController(Controller):
    kind = "static"

    def __init__(self, plan: Plan, knobs: KnobSpace) -> None:
        knobs.validate(plan)
        self.plan = plan

    def stage1(self, facts: RequestFacts) -> Stage1:
        return Stage1(self.plan.max_crops, self.plan.insert_pos, self.plan)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "plan": self.plan.to_dict()}


def static_artifact(plan: Plan, model_fingerprint: str, knobs: KnobSpace) -> dict[str, Any]:
    return {**artifact_header(StaticController.kind, model_fingerprint, knobs), "plan": plan.to_dict()}


def from_artifact(artifact: dict[str, Any], model: Model) -> StaticController:
    try:
        plan = Plan(**artifact["plan"])
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"static controller artifact: needs 'plan' with the fields of Plan ({err!r})") from err
    try:
        return StaticController(plan, model.knobs)
    except ValueError as err:
        raise ArtifactError(f"static controller artifact: {err}") from err
