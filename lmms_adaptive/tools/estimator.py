"""Fitting and evaluating the latency estimator (`controllers.estimator.LatencyEstimator`) on profile rows.

    python -m lmms_adaptive.tools.estimator fit PROFILE_DIR --out runs/estimator.json --holdout 0.2 --seed 0
    python -m lmms_adaptive.tools.estimator evaluate runs/estimator.json PROFILE_DIR --plots runs/estimator_eval

Profile rows are request records (`serving.records.RequestRecord`), so the estimator is fitted on the same
end-to-end latency it is judged on. Fits minimise relative residuals (each observation weighted by
1 / measured, floored at 5% of the stage's median so near-zero stages, e.g. the vision of a text-only
request, do not dominate), except the overhead, whose residual can be near zero or negative and is fitted in
milliseconds. They are robust: Huber weights over a few reweighted refits (`ROBUST_REFITS`), with the
residuals' scale from their median absolute deviation, so the few rows that met load from elsewhere on the
machine do not drag a stage's coefficients. Non-negative least squares is solved exactly by enumerating
supports (at most 2^5 small solves on the QR factor of the design matrix).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lmms_adaptive.controllers.estimator import (
    FEATURES,
    LatencyEstimator,
    StageModel,
    crop_features,
    decode_features,
    overhead_features,
    prefill_features,
    preprocess_features,
)
from lmms_adaptive.core.plan import KnobSpace
from lmms_adaptive.serving.records import RequestRecord
from lmms_adaptive.tools.cli import HelpFormatter, setup_logging, took
from lmms_adaptive.tools.profile import profile_knobs, read_profile

log = logging.getLogger(__name__)

RELATIVE_FLOOR = 0.05  # weights are 1 / max(measured, RELATIVE_FLOOR * median measured)
ROBUST_REFITS = 5  # Huber-reweighted refits after the first least-squares fit
HUBER_K = 1.345  # residuals beyond HUBER_K robust standard deviations are down-weighted (95% efficiency)
EVALUATED = ("preprocess", "vision", "prefill", "decode", "total")
GROUP_KNOBS = ("max_crops", "top_k", "n_blocks")


@dataclass(frozen=True)
class _Observations:
    """The design matrix of one stage, its measured milliseconds, and the row each observation comes from."""

    x: np.ndarray  # [n, n_features]
    y: np.ndarray  # [n]
    row: np.ndarray  # [n] index into the rows


def fit_estimator(rows: Sequence[RequestRecord], knobs: KnobSpace) -> LatencyEstimator:
    """Fit every stage on `rows` (one device, one model, plans of `knobs`). Raises ValueError when the rows
    are empty, mix devices or models, hold a plan outside the knob space, or do not vary enough to identify
    every feature of a stage."""
    if not rows:
        raise ValueError("no profile rows to fit the latency estimator on")
    device = _single(rows, "device")
    fingerprint = _single(rows, "model_fingerprint")
    for r in rows:
        try:
            knobs.validate(r.plan)
        except ValueError as err:
            raise ValueError(f"row {r.task}/{r.doc_id}: {err}") from None
    stages = {
        name: StageModel(FEATURES[name], tuple(float(c) for c in _fit_stage(name, obs, rows)))
        for name, obs in _observations(rows, knobs).items()
    }
    return LatencyEstimator(
        knobs=knobs,
        **stages,
        device=device,
        model_fingerprint=fingerprint,
        n_rows=len(rows),
        fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ----------------------------------------------------------------------------------------------------
# Design matrices and non-negative least squares
# ----------------------------------------------------------------------------------------------------


def _single(rows: Sequence[RequestRecord], field: str) -> str:
    values = sorted({getattr(r, field) for r in rows})
    if len(values) != 1:
        raise ValueError(f"the rows come from several values of {field} ({values}); fit one estimator per {field}")
    return values[0]


def _columns(features: tuple[Any, ...]) -> np.ndarray:
    return np.column_stack(np.broadcast_arrays(*features)).astype(float)


def _observations(rows: Sequence[RequestRecord], knobs: KnobSpace) -> dict[str, _Observations]:
    """Design matrices of every stage; decode has one observation per decode forward."""

    def col(field: str) -> np.ndarray:
        return np.array([getattr(r, field) for r in rows], dtype=float)

    index = np.arange(len(rows))
    crops, prompt = col("n_crops"), col("n_prompt_tokens")
    blocks = np.array([r.plan.n_blocks for r in rows], dtype=float)
    k_sum = np.array([knobs.expert_work(r.plan) for r in rows], dtype=float)
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
            _columns(preprocess_features(crops, col("image_pixels"))), col("preprocess_ms"), index
        ),
        "vision": _Observations(_columns(crop_features(crops)), col("vision_ms"), index),
        "prefill": _Observations(_columns(prefill_features(blocks, k_sum, prompt)), col("prefill_ms"), index),
        "decode": _Observations(
            _columns(decode_features(blocks[step_row], k_sum[step_row], prompt[step_row] + step_t)), step_ms, step_row
        ),
        "overhead": _Observations(_columns(overhead_features(n_steps + 1.0)), col("total_ms") - stages_ms, index),
    }


def _fit_stage(name: str, obs: _Observations, rows: Sequence[RequestRecord]) -> np.ndarray:
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


def _variety(rows: Sequence[RequestRecord]) -> str:
    columns = {
        "n_crops": [r.n_crops for r in rows],
        "image_pixels": [r.image_pixels for r in rows],
        **{knob: [getattr(r.plan, knob) for r in rows] for knob in ("top_k", "n_blocks", "insert_pos")},
        "n_prompt_tokens": [r.n_prompt_tokens for r in rows],
    }

    def values(name: str, column: list[int]) -> str:
        seen = sorted(set(column))
        return f"{name} {seen}" if len(seen) <= 8 else f"{name} {seen[0]}..{seen[-1]} ({len(seen)} values)"

    return ", ".join(values(name, column) for name, column in columns.items())


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
    rows: Sequence[RequestRecord], holdout_fraction: float, seed: int = 0
) -> tuple[list[RequestRecord], list[RequestRecord]]:
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


def _compare(estimator: LatencyEstimator, rows: Sequence[RequestRecord]) -> dict[str, _Comparison]:
    obs = _observations(rows, estimator.knobs)
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


def evaluate(estimator: LatencyEstimator, rows: Sequence[RequestRecord]) -> dict[str, Any]:
    """Metrics of preprocess, vision, prefill, per-token decode and total latency: overall ("all") and per
    value of max_crops, top_k and n_blocks. A row's total is predicted with its own number of forwards."""
    if not rows:
        raise ValueError("no profile rows to evaluate the latency estimator on")
    comparisons = _compare(estimator, rows)
    groups: dict[str, dict[str, np.ndarray]] = {"all": {"all": np.ones(len(rows), dtype=bool)}}
    for knob in GROUP_KNOBS:
        values = np.array([getattr(r.plan, knob) for r in rows])
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


def plot_evaluation(estimator: LatencyEstimator, rows: Sequence[RequestRecord], out_dir: str | Path) -> list[Path]:
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
    tiers = np.array([r.plan.max_crops for r in rows])

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


def _read_rows(folder: str) -> list[RequestRecord]:
    rows = read_profile(folder)
    log.info("read %d profile rows from %s", len(rows), folder)
    return rows


def _cmd_fit(args: argparse.Namespace) -> str:
    rows = _read_rows(args.profile_dir)
    train, held = split_rows(rows, args.holdout, args.seed)
    log.info("fitting on %d rows, holding out %d", len(train), len(held))
    estimator = fit_estimator(train, profile_knobs(args.profile_dir))
    shown, title = (held, "held-out evaluation") if held else (train, "in-sample evaluation (no hold-out)")
    print(format_evaluation(evaluate(estimator, shown), title))
    saved = estimator.save(args.out)
    plots = plot_evaluation(estimator, shown, args.out.parent / f"{args.out.stem}_plots")
    return f"fitted on {len(train)} rows ({len(held)} held out) -> {saved}; plots: {', '.join(str(p) for p in plots)}"


def _cmd_evaluate(args: argparse.Namespace) -> str:
    estimator = LatencyEstimator.load(args.estimator)
    rows = _read_rows(args.profile_dir)
    for field in ("device", "model_fingerprint"):
        seen = sorted({getattr(r, field) for r in rows})
        if seen != [getattr(estimator, field)]:
            log.warning("the estimator was fitted on %s %r, the rows have %s", field, getattr(estimator, field), seen)
    print(format_evaluation(evaluate(estimator, rows), f"evaluation of {args.estimator}"))
    plots = plot_evaluation(estimator, rows, args.plots) if args.plots is not None else []
    return f"evaluated on {len(rows)} rows; plots: {', '.join(str(p) for p in plots) or 'none (no --plots)'}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmms_adaptive.tools.estimator",
        description="Fit and evaluate the per-stage latency estimator from a profiling sweep's rows.",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, help="what to do (see COMMAND --help)")
    fit = commands.add_parser(
        "fit",
        help="fit on a profile folder (minus a held-out part), print the held-out evaluation, save the estimator",
        description="Fit on the training part of PROFILE_DIR, print the held-out evaluation, save the estimator "
        "JSON to --out and plots to the folder OUT_STEM_plots next to it.",
        formatter_class=HelpFormatter,
    )
    fit.add_argument("profile_dir", help="folder written by `python -m lmms_adaptive.tools.profile`")
    fit.add_argument("--out", type=Path, required=True, help="estimator JSON to write (required)")
    fit.add_argument("--holdout", type=float, default=0.2, help="fraction of samples held out")
    fit.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    fit.set_defaults(run=_cmd_fit)
    ev = commands.add_parser(
        "evaluate",
        help="evaluate a saved estimator on a profile folder",
        description="Print the metrics of a saved estimator on every row of PROFILE_DIR, optionally with plots.",
        formatter_class=HelpFormatter,
    )
    ev.add_argument("estimator", type=Path, help="estimator JSON written by `fit`")
    ev.add_argument("profile_dir", help="folder written by `python -m lmms_adaptive.tools.profile`")
    ev.add_argument("--plots", type=Path, default=None, help="folder to write the plots to (default: no plots)")
    ev.set_defaults(run=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        log.info("estimator %s: %s; took %s", args.command, args.run(args), took(started))
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
