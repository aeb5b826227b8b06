"""Latency estimator: per-stage linear models over physically motivated features, fitted from profile rows.

    python -m lmms_adaptive.estimator fit PROFILE_DIR --out runs/estimator.json --holdout 0.2 --seed 0
    python -m lmms_adaptive.estimator evaluate runs/estimator.json PROFILE_DIR --plots runs/estimator_eval

A controller asks `LatencyEstimator.predict(plan, n_crops, n_prompt_tokens, n_output_tokens, image_pixels=...)`
for every candidate plan of a request, so prediction is a handful of float operations (microseconds, no numpy).

Notation: C = n_crops (ViT crops), P = image_pixels / 1e6 (the source images' megapixels), L =
n_prompt_tokens, B = n_blocks (active decoder blocks),
K_sum = the MoE top-k summed over the active blocks. Blocks before `insert_pos` always run at the
model's own top-k K (see `KnobSpace.schedule`), so K_sum = p * K + (B - p) * k for a plan with top-k k and
insertion position p; K is `model_top_k` (by default the largest top-k in the fitted rows).

Stage models (milliseconds; every coefficient is fitted non-negative, so a larger plan is never predicted
to be faster than a smaller one, which is what a controller relies on when it walks the knob space):
- preprocess: [1, C, P] (resizing the source image scales with its pixels, cropping and normalising with
  the crops);
- vision: [1, C] (the ViT runs once per crop, at batch size 1);
- prefill: [1, B, B*L, K_sum*L, B*L^2]: per-block launches and expert weight reads (B), dense attention
  projections per token (B*L), the k experts each token runs through (K_sum*L), attention scores (B*L^2);
- decode step at context length c = L + t (the t-th decode forward, t >= 1): [1, B, K_sum, B*c]: the LM
  head and embedding (1), per-block attention weights (B), the k gathered experts per block (K_sum), the
  KV cache read (B*c). The features are affine in c, so the sum over a whole answer has a closed form;
- overhead: [n_forwards]: host time outside the timed stages (sampling, EOS checks) per forward pass,
  fitted on total_ms minus the sum of the stages.

Fits minimise relative residuals (each observation weighted by 1 / measured, floored at 5% of the stage's
median so near-zero stages, e.g. the vision of a text-only request, do not dominate), except the overhead,
whose residual can be near zero or negative and is fitted in milliseconds. They are robust: Huber weights
over a few reweighted refits (`ROBUST_REFITS`), with the residuals' scale from their median absolute
deviation, so the few rows that met load from elsewhere on the machine (latencies several times the
usual) do not drag a stage's coefficients. Non-negative least squares is
solved exactly by enumerating supports (at most 2^5 small solves on the QR factor of the design matrix).
The MoE `renormalize` knob does not change the work done and is not a feature.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .plan import Plan
from .records import ProfileRow

log = logging.getLogger(__name__)

FORMAT = "lmms_adaptive.latency_estimator"
FORMAT_VERSION = 2  # 2: preprocess also scales with the source megapixels
STAGES = ("preprocess", "vision", "prefill", "decode", "overhead")
FEATURES: dict[str, tuple[str, ...]] = {
    "preprocess": ("1", "C", "P"),
    "vision": ("1", "C"),
    "prefill": ("1", "B", "B*L", "K_sum*L", "B*L^2"),
    "decode": ("1", "B", "K_sum", "B*c"),
    "overhead": ("n_forwards",),
}
RELATIVE_FLOOR = 0.05  # weights are 1 / max(measured, RELATIVE_FLOOR * median measured)
ROBUST_REFITS = 5  # Huber-reweighted refits after the first least-squares fit
HUBER_K = 1.345  # residuals beyond HUBER_K robust standard deviations are down-weighted (95% efficiency)
EVALUATED = ("preprocess", "vision", "prefill", "decode", "total")
GROUP_KNOBS = ("max_crops", "top_k", "n_blocks")


# Feature functions: plain arithmetic, so they serve scalars (predict) and numpy arrays (fit) alike.
def _preprocess_features(n_crops: Any, image_pixels: Any) -> tuple[Any, ...]:
    return 1.0, n_crops, image_pixels / 1e6


def _crop_features(n_crops: Any) -> tuple[Any, ...]:
    return 1.0, n_crops


def _prefill_features(blocks: Any, k_sum: Any, prompt: Any) -> tuple[Any, ...]:
    return 1.0, blocks, blocks * prompt, k_sum * prompt, blocks * prompt * prompt


def _decode_features(blocks: Any, k_sum: Any, context: Any) -> tuple[Any, ...]:
    return 1.0, blocks, k_sum, blocks * context


def _overhead_features(n_forwards: Any) -> tuple[Any, ...]:
    return (n_forwards,)


def _k_sum(n_blocks: Any, top_k: Any, insert_pos: Any, model_top_k: int) -> Any:
    """MoE top-k summed over the active blocks: the first `insert_pos` blocks run at the model's top-k."""
    return insert_pos * model_top_k + (n_blocks - insert_pos) * top_k


@dataclass(frozen=True)
class LatencyPrediction:
    """Predicted milliseconds per stage; `decode_ms` is the sum over the decode steps, `overhead_ms` the host
    time between stages, and `total_ms` the sum of all of them."""

    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    overhead_ms: float
    total_ms: float


@dataclass(frozen=True)
class StageModel:
    """A fitted linear model of one stage: `features` names the columns `coef` multiplies."""

    features: tuple[str, ...]
    coef: tuple[float, ...]

    def at(self, values: tuple[float, ...]) -> float:
        return sum(map(operator.mul, self.coef, values))


@dataclass(frozen=True)
class _Observations:
    """The design matrix of one stage, its measured milliseconds, and the row each observation comes from."""

    x: np.ndarray  # [n, n_features]
    y: np.ndarray  # [n]
    row: np.ndarray  # [n] index into the rows


@dataclass(frozen=True)
class LatencyEstimator:
    """One fitted `StageModel` per stage, for one device and model (see the module docstring)."""

    model_top_k: int
    preprocess: StageModel
    vision: StageModel
    prefill: StageModel
    decode: StageModel
    overhead: StageModel
    device: str
    model_fingerprint: str
    n_rows: int
    fitted_at: str

    # -- fitting ----------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, rows: Sequence[ProfileRow], model_top_k: int | None = None) -> LatencyEstimator:
        """Fit every stage on `rows` (one device, one model). Raises ValueError when the rows are empty, mix
        devices or models, or do not vary enough to identify every feature of a stage."""
        if not rows:
            raise ValueError("no profile rows to fit the latency estimator on")
        device = _single(rows, "device")
        fingerprint = _single(rows, "model_fingerprint")
        k = max(r.top_k for r in rows) if model_top_k is None else model_top_k
        _check_plans(rows, k)
        stages = {}
        for name, obs in _observations(rows, k).items():
            stages[name] = StageModel(FEATURES[name], tuple(float(c) for c in _fit_stage(name, obs, rows)))
        return cls(
            model_top_k=k,
            **stages,
            device=device,
            model_fingerprint=fingerprint,
            n_rows=len(rows),
            fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    # -- prediction -------------------------------------------------------------------------------------

    def k_sum(self, plan: Plan) -> int:
        return _k_sum(plan.n_blocks, plan.top_k, plan.insert_pos, self.model_top_k)

    def decode_step_ms(self, plan: Plan, context_len: int) -> float:
        """One decode forward whose context (prompt plus tokens so far, itself included) is `context_len`."""
        return self.decode.at(_decode_features(plan.n_blocks, self.k_sum(plan), context_len))

    def predict(
        self, plan: Plan, n_crops: int, n_prompt_tokens: int, n_output_tokens: int, *, image_pixels: int
    ) -> LatencyPrediction:
        """Latency of a request that emits `n_output_tokens` tokens (counting a final EOS): the first comes
        from prefill, each further one from a decode forward at context n_prompt_tokens + t, t = 1..n-1.
        `image_pixels`: height x width summed over the request's source images (0 without images)."""
        if n_output_tokens < 0:
            raise ValueError(f"n_output_tokens must be >= 0, got {n_output_tokens}")
        blocks, k_sum, prompt = plan.n_blocks, self.k_sum(plan), n_prompt_tokens
        steps = max(n_output_tokens - 1, 0)
        step_at_0 = self.decode.at(_decode_features(blocks, k_sum, 0))
        per_context = self.decode.at(_decode_features(blocks, k_sum, 1)) - step_at_0
        preprocess = self.preprocess.at(_preprocess_features(n_crops, image_pixels))
        vision = self.vision.at(_crop_features(n_crops))
        prefill = self.prefill.at(_prefill_features(blocks, k_sum, prompt))
        decode = steps * step_at_0 + per_context * (steps * prompt + steps * (steps + 1) / 2)
        overhead = self.overhead.at(_overhead_features(steps + 1))
        return LatencyPrediction(
            preprocess, vision, prefill, decode, overhead, preprocess + vision + prefill + decode + overhead
        )

    # -- serialisation ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_top_k": self.model_top_k,
            "stages": {
                name: {"features": list(m.features), "coef": list(m.coef)}
                for name, m in ((name, getattr(self, name)) for name in STAGES)
            },
            "metadata": {
                "device": self.device,
                "model_fingerprint": self.model_fingerprint,
                "n_rows": self.n_rows,
                "fitted_at": self.fitted_at,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyEstimator:
        """Inverse of `to_dict`; raises ValueError naming the first missing or invalid key."""
        if _get(d, "format") != FORMAT:
            raise ValueError(f"'format' is {d['format']!r}, expected {FORMAT!r}")
        if _get(d, "version") != FORMAT_VERSION:
            raise ValueError(f"'version' is {d['version']!r}, this code reads version {FORMAT_VERSION}")
        stages = _get(d, "stages")
        meta = _get(d, "metadata")
        return cls(
            model_top_k=int(_get(d, "model_top_k")),
            **{name: _stage_from_dict(name, _get(stages, name, f"stages.{name}")) for name in STAGES},
            device=str(_get(meta, "device", "metadata.device")),
            model_fingerprint=str(_get(meta, "model_fingerprint", "metadata.model_fingerprint")),
            n_rows=int(_get(meta, "n_rows", "metadata.n_rows")),
            fitted_at=str(_get(meta, "fitted_at", "metadata.fitted_at")),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyEstimator:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON latency estimator ({err})") from err
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _get(d: Any, key: str, where: str | None = None) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"missing key '{where or key}'")
    return d[key]


def _stage_from_dict(name: str, d: Any) -> StageModel:
    features = tuple(_get(d, "features", f"stages.{name}.features"))
    coef = _get(d, "coef", f"stages.{name}.coef")
    if features != FEATURES[name]:
        raise ValueError(f"'stages.{name}.features' is {list(features)}, this code computes {list(FEATURES[name])}")
    if not isinstance(coef, list) or len(coef) != len(features) or not all(isinstance(c, (int, float)) for c in coef):
        raise ValueError(f"'stages.{name}.coef' must be {len(features)} numbers, got {coef!r}")
    return StageModel(features, tuple(float(c) for c in coef))


# ----------------------------------------------------------------------------------------------------
# Design matrices and non-negative least squares
# ----------------------------------------------------------------------------------------------------


def _single(rows: Sequence[ProfileRow], field: str) -> str:
    values = sorted({getattr(r, field) for r in rows})
    if len(values) != 1:
        raise ValueError(f"the rows come from several values of {field} ({values}); fit one estimator per {field}")
    return values[0]


def _check_plans(rows: Sequence[ProfileRow], model_top_k: int) -> None:
    for r in rows:
        if not 0 <= r.insert_pos <= r.n_blocks or r.top_k > model_top_k:
            raise ValueError(
                f"row {r.task}/{r.doc_id}: plan {r.plan} is outside the knob space "
                f"(insert_pos must be <= n_blocks, top_k <= model_top_k {model_top_k})"
            )


def _columns(features: tuple[Any, ...]) -> np.ndarray:
    return np.column_stack(np.broadcast_arrays(*features)).astype(float)


def _observations(rows: Sequence[ProfileRow], model_top_k: int) -> dict[str, _Observations]:
    """Design matrices of every stage; decode has one observation per decode forward."""

    def col(field: str) -> np.ndarray:
        return np.array([getattr(r, field) for r in rows], dtype=float)

    index = np.arange(len(rows))
    crops, blocks, prompt = col("n_crops"), col("n_blocks"), col("n_prompt_tokens")
    k_sum = _k_sum(blocks, col("top_k"), col("insert_pos"), model_top_k)
    n_steps = np.array([len(r.decode_ms) for r in rows])
    step_row = np.repeat(index, n_steps)
    step_t = np.concatenate([np.arange(1, n + 1) for n in n_steps]) if len(step_row) else np.zeros(0)
    step_ms = np.concatenate([np.asarray(r.decode_ms, dtype=float) for r in rows])
    stages_ms = (
        col("preprocess_ms")
        + col("vision_ms")
        + col("prefill_ms")
        + np.bincount(step_row, weights=step_ms, minlength=len(rows))
    )
    return {
        "preprocess": _Observations(
            _columns(_preprocess_features(crops, col("image_pixels"))), col("preprocess_ms"), index
        ),
        "vision": _Observations(_columns(_crop_features(crops)), col("vision_ms"), index),
        "prefill": _Observations(_columns(_prefill_features(blocks, k_sum, prompt)), col("prefill_ms"), index),
        "decode": _Observations(
            _columns(_decode_features(blocks[step_row], k_sum[step_row], prompt[step_row] + step_t)), step_ms, step_row
        ),
        "overhead": _Observations(_columns(_overhead_features(n_steps + 1.0)), col("total_ms") - stages_ms, index),
    }


def _fit_stage(name: str, obs: _Observations, rows: Sequence[ProfileRow]) -> np.ndarray:
    if len(obs.y) == 0:
        raise ValueError(f"{name}: the rows have no observations of this stage (seen: {_variety(rows)})")
    if not np.isfinite(obs.y).all():
        raise ValueError(f"{name}: the rows contain non-finite latencies")
    x, y = obs.x, obs.y
    if name != "overhead":
        weight = 1.0 / np.maximum(np.abs(y), RELATIVE_FLOOR * np.median(np.abs(y)) + 1e-12)
        x, y = x * weight[:, None], y * weight
    unidentified = _unidentified(x)
    if unidentified:
        names = [FEATURES[name][j] for j in unidentified]
        raise ValueError(
            f"{name}: {len(y)} observations from rows that do not vary enough to fit feature(s) {names} "
            f"(seen: {_variety(rows)})"
        )
    return _robust_nnls(x, y)


def _robust_nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares with Huber weights, by iteratively reweighted refits: a residual beyond
    HUBER_K robust standard deviations (1.4826 x the median absolute deviation) counts linearly, not
    quadratically. Exact data (zero scale) keeps the plain solution."""
    coef = _nnls(x, y)
    for _ in range(ROBUST_REFITS):
        residual = x @ coef - y
        scale = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        if scale <= 1e-12 * max(1.0, float(np.abs(y).max())):
            break
        weight = np.sqrt(np.minimum(1.0, HUBER_K * scale / np.maximum(np.abs(residual), 1e-300)))
        coef = _nnls(x * weight[:, None], y * weight)
    return coef


def _unidentified(x: np.ndarray) -> list[int]:
    """Columns that are (numerically) linear combinations of the columns before them. Columns are scaled to
    unit norm, so one absolute singular-value tolerance fits every feature's units."""
    norms = np.linalg.norm(x, axis=0)
    r = np.linalg.qr(x / np.where(norms > 0, norms, 1.0), mode="r")
    bad: list[int] = []
    kept: list[int] = []
    for j in range(x.shape[1]):
        trial = kept + [j]
        if np.linalg.matrix_rank(r[:, trial], tol=1e-9) < len(trial):
            bad.append(j)
        else:
            kept = trial
    return bad


def _variety(rows: Sequence[ProfileRow]) -> str:
    def values(field: str) -> str:
        seen = sorted({getattr(r, field) for r in rows})
        return f"{field} {seen}" if len(seen) <= 8 else f"{field} {seen[0]}..{seen[-1]} ({len(seen)} values)"

    fields = ("n_crops", "image_pixels", "top_k", "n_blocks", "insert_pos", "n_prompt_tokens")
    return ", ".join(values(f) for f in fields)


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||x c - y|| subject to c >= 0, exactly: the optimum is the unconstrained least-squares solution on
    its own support, so the best feasible one over all supports is it (2^p solves of p x p systems)."""
    norms = np.linalg.norm(x, axis=0)
    q, r = np.linalg.qr(x / norms)
    qy = q.T @ y
    p = x.shape[1]
    best, best_residual = np.zeros(p), float(qy @ qy)
    for size in range(1, p + 1):
        for support in itertools.combinations(range(p), size):
            cols = list(support)
            coef = np.linalg.lstsq(r[:, cols], qy, rcond=None)[0]
            if (coef < 0).any():
                continue
            residual = float(np.sum((r[:, cols] @ coef - qy) ** 2))
            if residual < best_residual * (1 - 1e-12):
                best, best_residual = np.zeros(p), residual
                best[cols] = coef
    return best / norms


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def split_rows(
    rows: Sequence[ProfileRow], holdout_fraction: float, seed: int = 0
) -> tuple[list[ProfileRow], list[ProfileRow]]:
    """(train, held out), split by sample (task, doc_id) so all plans of a sample land on one side; the
    held-out side gets round(fraction * n_samples) samples (at least one when the fraction is positive)."""
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    samples = sorted({(r.task, r.doc_id) for r in rows})
    n_out = max(1, round(holdout_fraction * len(samples))) if holdout_fraction > 0 and samples else 0
    if n_out and n_out >= len(samples):
        raise ValueError(f"cannot hold out {n_out} of {len(samples)} samples and still train on some")
    order = np.random.default_rng(seed).permutation(len(samples))
    held = {samples[i] for i in order[:n_out]}
    return [r for r in rows if (r.task, r.doc_id) not in held], [r for r in rows if (r.task, r.doc_id) in held]


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float | int | None]:
    """MAE, RMSE (ms), MAPE and its median MdAPE (%, over nonzero measurements) and R2 (None when the
    measurements are constant). MdAPE says what a typical request sees when a few measurements met load."""
    err = predicted - measured
    ss_tot = float(np.sum((measured - measured.mean()) ** 2))
    nonzero = measured != 0
    ape = np.abs(err[nonzero] / measured[nonzero]) * 100
    return {
        "n": len(measured),
        "mae_ms": float(np.mean(np.abs(err))),
        "rmse_ms": float(np.sqrt(np.mean(err**2))),
        "mape_pct": float(np.mean(ape)) if nonzero.any() else None,
        "mdape_pct": float(np.median(ape)) if nonzero.any() else None,
        "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else None,
    }


@dataclass(frozen=True)
class _Comparison:
    """Predicted and measured values of one evaluated quantity, with the row of each value."""

    predicted: np.ndarray
    measured: np.ndarray
    row: np.ndarray


def _compare(estimator: LatencyEstimator, rows: Sequence[ProfileRow]) -> dict[str, _Comparison]:
    obs = _observations(rows, estimator.model_top_k)
    out = {
        name: _Comparison(obs[name].x @ np.array(getattr(estimator, name).coef), obs[name].y, obs[name].row)
        for name in ("preprocess", "vision", "prefill", "decode")
    }
    total = [
        estimator.predict(
            r.plan, r.n_crops, r.n_prompt_tokens, len(r.decode_ms) + 1, image_pixels=r.image_pixels
        ).total_ms
        for r in rows
    ]
    out["total"] = _Comparison(np.array(total), np.array([r.total_ms for r in rows]), np.arange(len(rows)))
    return out


def evaluate(estimator: LatencyEstimator, rows: Sequence[ProfileRow]) -> dict[str, Any]:
    """Metrics of preprocess, vision, prefill, per-token decode and total latency: overall ("all") and per
    value of max_crops, top_k and n_blocks. A row's total is predicted with its own number of forwards."""
    if not rows:
        raise ValueError("no profile rows to evaluate the latency estimator on")
    comparisons = _compare(estimator, rows)
    groups: dict[str, dict[str, np.ndarray]] = {"all": {"all": np.ones(len(rows), dtype=bool)}}
    for knob in GROUP_KNOBS:
        values = np.array([getattr(r, knob) for r in rows])
        groups[f"by_{knob}"] = {str(v): values == v for v in sorted(set(values.tolist()))}
    result: dict[str, Any] = {"n_rows": len(rows), "n_samples": len({(r.task, r.doc_id) for r in rows})}
    for group, masks in groups.items():
        result[group] = {
            value: {
                name: metrics(c.predicted[mask[c.row]], c.measured[mask[c.row]]) if mask[c.row].any() else None
                for name, c in comparisons.items()
            }
            for value, mask in masks.items()
        }
    return result


def format_evaluation(evaluation: dict[str, Any], title: str) -> str:
    """A fixed-width table of `evaluate`'s result, one line per (group, quantity)."""
    lines = [
        f"{title}: {evaluation['n_rows']} rows from {evaluation['n_samples']} samples",
        f"{'group':<14}{'quantity':<12}{'n':>8}{'MAE ms':>11}{'RMSE ms':>11}{'MAPE %':>10}{'MdAPE %':>10}{'R2':>12}",
    ]
    for group in ("all", *(f"by_{k}" for k in GROUP_KNOBS)):
        for value, by_name in evaluation[group].items():
            label = "all" if group == "all" else f"{group[3:]}={value}"
            for name in EVALUATED:
                m = by_name[name]
                if m is not None:
                    lines.append(
                        f"{label:<14}{name:<12}{m['n']:>8}{m['mae_ms']:>11.3f}{m['rmse_ms']:>11.3f}"
                        f"{_fmt(m['mape_pct'], 2):>10}{_fmt(m['mdape_pct'], 2):>10}{_fmt(m['r2'], 4):>12}"
                    )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_evaluation(estimator: LatencyEstimator, rows: Sequence[ProfileRow], out_dir: str | Path) -> list[Path]:
    """Predicted-vs-measured scatter of total and prefill latency (coloured by tier) and a histogram of their
    relative errors; returns the two PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no profile rows to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparisons = _compare(estimator, rows)
    tiers = np.array([r.max_crops for r in rows])

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, name in zip(axes, ("total", "prefill")):
        c = comparisons[name]
        for tier in sorted(set(tiers.tolist())):
            mask = tiers[c.row] == tier
            ax.scatter(c.measured[mask], c.predicted[mask], s=8, alpha=0.6, label=f"max_crops={tier}")
        low, high = _span(c.measured, c.predicted)
        ax.plot([low, high], [low, high], color="black", linewidth=0.8, label="predicted = measured")
        ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="predicted ms", title=f"{name} latency")
        ax.legend(fontsize=8)
    scatter = out / "predicted_vs_measured.png"
    fig.tight_layout()
    fig.savefig(scatter, dpi=120)
    plt.close(fig)

    errors = {name: _relative_error_pct(comparisons[name]) for name in ("total", "prefill")}
    bins = np.histogram_bin_edges(np.concatenate(list(errors.values())), bins=40)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, error in errors.items():
        ax.hist(error, bins=bins, alpha=0.6, label=name)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="relative error (predicted - measured) / measured, %", ylabel="rows", title="latency error")
    ax.legend()
    histogram = out / "relative_error.png"
    fig.tight_layout()
    fig.savefig(histogram, dpi=120)
    plt.close(fig)
    return [scatter, histogram]


def _relative_error_pct(c: _Comparison) -> np.ndarray:
    ok = c.measured > 0
    return 100 * (c.predicted[ok] - c.measured[ok]) / c.measured[ok]


def _span(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate(arrays)
    positive = values[values > 0]
    return (float(positive.min()), float(positive.max())) if len(positive) else (1e-3, 1.0)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _read_rows(folder: str) -> list[ProfileRow]:
    from .profile import read_profile

    rows = read_profile(folder)
    log.info("read %d profile rows from %s", len(rows), folder)
    return rows


def _cmd_fit(args: argparse.Namespace) -> None:
    rows = _read_rows(args.profile_dir)
    train, held = split_rows(rows, args.holdout, args.seed)
    log.info("fitting on %d rows, holding out %d", len(train), len(held))
    estimator = LatencyEstimator.fit(train, model_top_k=args.model_top_k)
    shown, title = (held, "held-out evaluation") if held else (train, "in-sample evaluation (no hold-out)")
    print(format_evaluation(evaluate(estimator, shown), title))
    log.info("saved the estimator to %s", estimator.save(args.out))
    plots = plot_evaluation(estimator, shown, args.out.parent / f"{args.out.stem}_plots")
    log.info("saved plots: %s", ", ".join(str(p) for p in plots))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    estimator = LatencyEstimator.load(args.estimator)
    rows = _read_rows(args.profile_dir)
    for field in ("device", "model_fingerprint"):
        seen = sorted({getattr(r, field) for r in rows})
        if seen != [getattr(estimator, field)]:
            log.warning("the estimator was fitted on %s %r, the rows have %s", field, getattr(estimator, field), seen)
    print(format_evaluation(evaluate(estimator, rows), f"evaluation of {args.estimator}"))
    if args.plots is not None:
        log.info("saved plots: %s", ", ".join(str(p) for p in plot_evaluation(estimator, rows, args.plots)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmms_adaptive.estimator",
        description="Fit and evaluate the per-stage latency estimator from a profiling sweep's rows.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser(
        "fit",
        help="fit on a profile folder (minus a held-out part), print the held-out evaluation, save the estimator",
        description="Fit on the training part of PROFILE_DIR, print the held-out evaluation, save the estimator "
        "JSON to --out and plots to the folder OUT_STEM_plots next to it.",
    )
    fit.add_argument("profile_dir", help="folder written by `python -m lmms_adaptive.profile`")
    fit.add_argument("--out", type=Path, required=True, help="estimator JSON to write")
    fit.add_argument("--holdout", type=float, default=0.2, help="fraction of samples held out (default 0.2)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the hold-out split (default 0)")
    fit.add_argument(
        "--model-top-k", type=int, default=None, help="the model's own MoE top-k (default: largest top_k in the rows)"
    )
    fit.set_defaults(run=_cmd_fit)
    ev = commands.add_parser(
        "evaluate",
        help="evaluate a saved estimator on a profile folder",
        description="Print the metrics of a saved estimator on every row of PROFILE_DIR, optionally with plots.",
    )
    ev.add_argument("estimator", type=Path, help="estimator JSON written by `fit`")
    ev.add_argument("profile_dir", help="folder written by `python -m lmms_adaptive.profile`")
    ev.add_argument("--plots", type=Path, default=None, help="folder to write the plots to")
    ev.set_defaults(run=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
