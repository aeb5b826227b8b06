"""The budget guard: budgets that hold when the machine runs slower (or faster) than it was profiled.

The guard keeps an online slowdown estimate from the measured over predicted end-to-end latency of recent
requests, each predicted by the model's latency estimator for the plan that ran. A controller is then shown
`budget / slowdown`: when requests take 1.5x what the estimator predicts, it plans for two thirds of the
budget. The first request sees slowdown 1; warm-up requests are not observed. Violations are still judged
against the real budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from lmms_adaptive.controllers.estimator import LatencyEstimator
from lmms_adaptive.core.plan import Plan

log = logging.getLogger(__name__)

ESTIMATOR_FILE = "latency_estimator.json"  # in the checkpoint folder: `python -m lmms_adaptive.tools.estimator fit`
RATIO_RANGE = (0.02, 50.0)  # one observation moves the estimate at most this far (a stalled request, a clock jump)


@dataclass
class BudgetGuard:
    """The slowdown is a quantile of recent measured / predicted latency ratios: exponential moving averages
    of their logarithm (m) and its squared deviation (v) give exp(m + z * sqrt(v)), z the normal quantile of
    `quantile`. So the guard covers the estimator's scatter too, not only a slower machine: at 0.9 a plan
    predicted to fit is meant to fit nine requests in ten."""

    estimator: LatencyEstimator
    quantile: float = 0.9
    smoothing: float = 0.2  # weight of the newest observation
    log_mean: float = 0.0
    log_var: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if not 0.5 <= self.quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {self.quantile}")

    @property
    def slowdown(self) -> float:
        """The factor a budget is divided by (1 before any observation)."""
        return math.exp(self.log_mean + NormalDist().inv_cdf(self.quantile) * math.sqrt(self.log_var))

    def budget_for(self, budget_ms: float | None) -> float | None:
        """The budget a controller plans for."""
        return None if budget_ms is None else budget_ms / self.slowdown

    def observe(
        self, plan: Plan, n_crops: int, n_prompt_tokens: int, n_forwards: int, image_pixels: int, total_ms: float
    ) -> None:
        """Take in one served request: its plan, token counts, forward passes (1 + decode steps) and latency."""
        predicted = self.estimator.predict(plan, n_crops, n_prompt_tokens, n_forwards, image_pixels=image_pixels)
        if not (predicted.total_ms > 0 and total_ms > 0 and math.isfinite(total_ms)):
            return
        ratio = math.log(min(max(total_ms / predicted.total_ms, RATIO_RANGE[0]), RATIO_RANGE[1]))
        deviation = ratio - self.log_mean
        self.log_mean += self.smoothing * deviation
        self.log_var = (1 - self.smoothing) * (self.log_var + self.smoothing * deviation**2)


def checkpoint_estimator(folder: Path | None, model_id: str) -> LatencyEstimator | None:
    """The latency estimator stored in a checkpoint folder for this model, or None (none there, or one fitted
    on another model: ignored with a warning)."""
    path = None if folder is None else folder / ESTIMATOR_FILE
    if path is None or not path.is_file():
        return None
    estimator = LatencyEstimator.load(path)
    if estimator.model_fingerprint != model_id:
        log.warning("%s was fitted on model %s, not %s: ignored", path, estimator.model_fingerprint, model_id)
        return None
    return estimator
