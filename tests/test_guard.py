"""The budget guard: the slowdown it estimates from measured / predicted latency, and where it applies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lmms_adaptive.controllers.base import Controller, Stage1
from lmms_adaptive.controllers.guard import BudgetGuard, checkpoint_estimator
from lmms_adaptive.core.plan import Plan, RequestFacts
from lmms_adaptive.serving.request import Request, serve

PLAN = Plan(3, 8, 8)


def predicting(ms: float) -> SimpleNamespace:
    """An estimator that predicts `ms` for every request."""
    return SimpleNamespace(predict=lambda *args, **kwargs: SimpleNamespace(total_ms=ms))


def observe(guard: BudgetGuard, total_ms: float) -> None:
    guard.observe(PLAN, 3, 100, 2, 640 * 480, total_ms)


def test_a_steady_slowdown_is_learned_and_divides_the_budget() -> None:
    guard = BudgetGuard(predicting(100.0))
    assert guard.slowdown == 1.0 and guard.budget_for(200.0) == 200.0 and guard.budget_for(None) is None
    for _ in range(200):
        observe(guard, 200.0)
    assert guard.slowdown == pytest.approx(2.0, rel=1e-3)  # no scatter left: the quantile is the ratio itself
    assert guard.budget_for(200.0) == pytest.approx(100.0, rel=1e-3)


def test_scatter_raises_the_slowdown_to_its_quantile() -> None:
    guard = BudgetGuard(predicting(100.0), quantile=0.9, smoothing=0.05)
    for i in range(400):
        observe(guard, 100.0 * math.exp(0.2 if i % 2 else -0.2))  # log ratios +-0.2: mean 0, sd 0.2
    assert guard.slowdown == pytest.approx(math.exp(1.2816 * 0.2), rel=0.05)
    median = BudgetGuard(predicting(100.0), quantile=0.5)
    for i in range(50):
        observe(median, 100.0 * math.exp(0.2 if i % 2 else -0.2))
    assert median.slowdown == pytest.approx(1.0, abs=0.05)


def test_bad_settings_and_observations() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        BudgetGuard(predicting(1.0), smoothing=0.0)
    with pytest.raises(ValueError, match="quantile"):
        BudgetGuard(predicting(1.0), quantile=1.0)
    guard = BudgetGuard(predicting(100.0))
    observe(guard, math.nan)
    observe(guard, 1e9)  # one stalled request moves it at most to the clamp
    assert 1.0 < guard.slowdown < 50.0


class Recording(Controller):
    kind = "recording"

    def __init__(self) -> None:
        self.budgets: list[float | None] = []

    def stage1(self, facts: RequestFacts) -> Stage1:
        self.budgets.append(facts.budget_ms)
        return Stage1(PLAN.max_crops, PLAN.insert_pos, PLAN)


def test_serve_shows_the_controller_the_guarded_budget_and_records_it(rt) -> None:
    guard, controller = BudgetGuard(predicting(1e-3)), Recording()  # everything runs "slower than predicted"
    request = Request("What color is the square?", budget_ms=100.0)
    first, second = serve(rt, controller, request, guard), serve(rt, controller, request, guard)
    assert first.record.slowdown == 1.0 and controller.budgets[0] == 100.0
    assert second.record.slowdown == pytest.approx(100.0 / controller.budgets[1]) and second.record.slowdown > 1
    assert second.record.budget_ms == 100.0  # violations are judged on the real budget
    assert serve(rt, controller, request).record.slowdown is None


def test_the_built_in_model_ships_its_estimator(rt, tiny_dir) -> None:
    estimator = checkpoint_estimator(rt.folder, rt.model_id)
    assert estimator is not None and estimator.model_fingerprint == rt.model_id
    assert checkpoint_estimator(rt.folder, "another-model") is None and checkpoint_estimator(tiny_dir, "x") is None
