"""The latency estimator: recovery of a known latency formula, closed-form prediction, persistence, metrics,
the by-sample split, plots and the CLI. Everything runs on synthetic RequestRecords (no model)."""

from __future__ import annotations

import json
import math
import timeit
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fake_records import make_record, write_profile

from lmms_adaptive.controllers.base import knob_space_json
from lmms_adaptive.controllers.estimator import FEATURES, LatencyEstimator
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.plan import KnobSpace, Plan
from lmms_adaptive.serving.records import RequestRecord
from lmms_adaptive.tools.estimator import evaluate, fit_estimator, format_evaluation, main, plot_evaluation, split_rows

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "lmms_adaptive" / "resources" / "molmoe_config.json"
KNOBS = KnobSpace.from_config(MolmoeConfig.from_dict(json.loads(PACKAGED_CONFIG.read_text())))  # MolmoE-1B's

# The latency formula the synthetic rows follow, in the estimator's feature order (see FEATURES).
TRUE = {
    "preprocess": (2.0, 1.5, 8.0),
    "vision": (3.0, 6.0),
    "prefill": (4.0, 0.8, 0.002, 0.0004, 1e-7),
    "decode": (3.0, 0.45, 0.02, 2e-5),
    "overhead": (0.15,),
}


def true_ms(stage: str, plan: Plan, n_crops: int = 0, context: int = 0, pixels: int = 0) -> float:
    """The known formula, written out independently of the estimator's feature functions."""
    c = TRUE[stage]
    blocks, p = plan.n_blocks, plan.insert_pos
    k_sum = p * KNOBS.model_top_k + (blocks - p) * plan.top_k
    if stage == "preprocess":
        return c[0] + c[1] * n_crops + c[2] * pixels / 1e6
    if stage == "vision":
        return c[0] + c[1] * n_crops
    if stage == "prefill":
        return c[0] + c[1] * blocks + c[2] * blocks * context + c[3] * k_sum * context + c[4] * blocks * context**2
    return c[0] + c[1] * blocks + c[2] * k_sum + c[3] * blocks * context  # decode at context length `context`


def synthetic_rows(n_samples: int, plans_per_sample: int, noise: float, seed: int) -> list[RequestRecord]:
    """Samples (an image size, a question length, an answer length) x random valid MolmoE plans; every
    latency from the known formula, times lognormal noise of relative size `noise`."""
    rng = np.random.default_rng(seed)
    plans = [
        Plan(crops, k, blocks, p)
        for crops in (3, 6, 12) for k in range(4, 9) for p in (1, 3, 5) for blocks in range(max(12, p + 11), 17)
    ]  # fmt: skip

    def noisy(value: float) -> float:
        return float(value * np.exp(noise * rng.standard_normal()))

    rows = []
    for doc in range(n_samples):
        image_crops, text = int(rng.integers(1, 13)), int(rng.integers(15, 60))
        pixels = int(rng.integers(200, 1400)) * int(rng.integers(200, 1400))
        answer, eos = int(rng.integers(1, 20)), bool(rng.integers(0, 2))
        for i in rng.choice(len(plans), plans_per_sample, replace=False):
            plan = plans[i]
            n_crops = min(image_crops, plan.max_crops) + 1
            prompt = 144 * n_crops + text
            n_steps = answer if eos else answer - 1
            stages = {s: noisy(true_ms(s, plan, n_crops, prompt, pixels)) for s in ("preprocess", "vision", "prefill")}
            decode = [noisy(true_ms("decode", plan, context=prompt + t)) for t in range(1, n_steps + 1)]
            total = sum(stages.values()) + sum(decode) + TRUE["overhead"][0] * (n_steps + 1)
            rows.append(
                make_record(
                    doc_id=doc,
                    max_crops=plan.max_crops,
                    top_k=plan.top_k,
                    n_blocks=plan.n_blocks,
                    insert_pos=plan.insert_pos,
                    n_crops=n_crops,
                    image_pixels=pixels,
                    n_image_tokens=144 * n_crops,
                    n_text_tokens=text,
                    n_prompt_tokens=prompt,
                    n_output_tokens=answer,
                    preprocess_ms=stages["preprocess"],
                    vision_ms=stages["vision"],
                    prefill_ms=stages["prefill"],
                    decode_ms=decode,
                    total_ms=total,
                    stop_reason="eos" if eos else "length",
                )
            )
    return rows


@pytest.fixture(scope="module")
def exact_rows() -> list[RequestRecord]:
    return synthetic_rows(n_samples=12, plans_per_sample=8, noise=0.0, seed=1)


@pytest.fixture(scope="module")
def exact(exact_rows: list[RequestRecord]) -> LatencyEstimator:
    return fit_estimator(exact_rows, KNOBS)


def hand_estimator() -> LatencyEstimator:
    """predict: preprocess = n_crops, vision = 1, prefill = 10, each decode step = 2, no overhead."""
    coef = {
        "preprocess": [0, 1, 0],
        "vision": [1, 0],
        "prefill": [10, 0, 0, 0, 0],
        "decode": [2, 0, 0, 0],
        "overhead": [0],
    }
    return LatencyEstimator.from_dict(
        {
            "format": "lmms_adaptive.latency_estimator",
            "version": 3,
            "knob_space": knob_space_json(KNOBS),
            "stages": {s: {"features": list(FEATURES[s]), "coef": coef[s]} for s in FEATURES},
            "metadata": {"device": "test-gpu", "model_fingerprint": "f00d", "n_rows": 2, "fitted_at": "now"},
        }
    )


# -- fitting ------------------------------------------------------------------------------------------


def test_fit_recovers_the_formula_without_noise(exact: LatencyEstimator, exact_rows: list[RequestRecord]) -> None:
    assert exact.knobs == KNOBS
    for stage, coef in TRUE.items():
        assert getattr(exact, stage).features == FEATURES[stage]
        np.testing.assert_allclose(getattr(exact, stage).coef, coef, rtol=1e-6, err_msg=stage)
    assert (exact.n_rows, exact.device, exact.model_fingerprint) == (len(exact_rows), "test-gpu", "f00d")
    row = exact_rows[0]
    got = exact.predict(
        row.plan, row.n_crops, row.n_prompt_tokens, len(row.decode_ms) + 1, image_pixels=row.image_pixels
    )
    assert got.total_ms == pytest.approx(row.total_ms, rel=1e-9)


def test_held_out_errors_are_small_with_noise() -> None:
    rows = synthetic_rows(n_samples=40, plans_per_sample=6, noise=0.02, seed=2)
    train, held = split_rows(rows, 0.25, seed=0)
    estimator = fit_estimator(train, KNOBS)
    overall = evaluate(estimator, held)["all"]["all"]
    assert overall["prefill"]["mape_pct"] < 3.0
    assert overall["total"]["mape_pct"] < 8.0
    assert overall["decode"]["mape_pct"] < 3.0
    assert overall["prefill"]["r2"] > 0.99


def test_rows_that_met_load_do_not_drag_the_fit() -> None:
    """5% of the rows several times slower in every stage (another job on the machine): the robust fit still
    predicts the clean formula closely; plain least squares on the same rows would not."""
    rows = synthetic_rows(n_samples=40, plans_per_sample=6, noise=0.01, seed=4)
    rng = np.random.default_rng(0)
    loaded = set(rng.choice(len(rows), len(rows) // 20, replace=False).tolist())
    spiked = [
        replace(r, vision_ms=r.vision_ms * 4, prefill_ms=r.prefill_ms * 3, decode_ms=[d * 3 for d in r.decode_ms],
                total_ms=r.total_ms * 3) if i in loaded else r
        for i, r in enumerate(rows)
    ]  # fmt: skip
    clean = synthetic_rows(n_samples=10, plans_per_sample=6, noise=0.0, seed=5)
    overall = evaluate(fit_estimator(spiked, KNOBS), clean)["all"]["all"]
    for stage in ("vision", "prefill", "decode", "total"):  # measured: 0.09, 0.04, 0.03, 0.03 %
        assert overall[stage]["mape_pct"] < 0.3, stage
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lmms_adaptive.tools.estimator.ROBUST_REFITS", 0)
        plain = evaluate(fit_estimator(spiked, KNOBS), clean)["all"]["all"]
    for stage in ("vision", "prefill", "decode"):  # measured: 0.9, 1.1, 1.6 %
        assert plain[stage]["mape_pct"] > 5 * overall[stage]["mape_pct"], stage


def test_insert_pos_counts_the_early_blocks_at_the_model_top_k(exact: LatencyEstimator) -> None:
    early = Plan(12, 4, 16, insert_pos=5)
    assert KNOBS.expert_work(early) == 5 * 8 + 11 * 4
    assert exact.decode_step_ms(early, 800) == pytest.approx(true_ms("decode", early, context=800), rel=1e-6)
    assert exact.decode_step_ms(early, 800) > exact.decode_step_ms(Plan(12, 4, 16, insert_pos=1), 800)


def test_fit_rejects_empty_mixed_and_uniform_rows(exact_rows: list[RequestRecord]) -> None:
    with pytest.raises(ValueError, match="no profile rows"):
        fit_estimator([], KNOBS)
    with pytest.raises(ValueError, match="several values of device"):
        fit_estimator([*exact_rows, replace(exact_rows[0], device="other-gpu")], KNOBS)
    one_plan = [replace(r, plan=Plan(r.plan.max_crops, 8, 16, 1)) for r in exact_rows]
    with pytest.raises(ValueError, match=r"prefill: .*feature\(s\) \['B'.*n_blocks \[16\]"):
        fit_estimator(one_plan, KNOBS)
    with pytest.raises(ValueError, match=r"row synth_vqa_test/0: plan\.top_k must be in 1\.\.4"):
        fit_estimator(exact_rows, replace(KNOBS, model_top_k=4))


# -- prediction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_output_tokens", [0, 1, 2, 37])
def test_closed_form_total_equals_the_explicit_sum(exact: LatencyEstimator, n_output_tokens: int) -> None:
    plan, n_crops, prompt = Plan(6, 5, 14, insert_pos=3), 7, 1020
    got = exact.predict(plan, n_crops, prompt, n_output_tokens, image_pixels=640 * 480)
    steps = range(1, max(n_output_tokens - 1, 0) + 1)
    decode = sum(exact.decode_step_ms(plan, prompt + t) for t in steps)
    assert got.decode_ms == pytest.approx(decode, rel=1e-12, abs=1e-12)
    assert got.prefill_ms == pytest.approx(true_ms("prefill", plan, context=prompt), rel=1e-6)
    assert got.preprocess_ms == pytest.approx(true_ms("preprocess", plan, n_crops, pixels=640 * 480), rel=1e-6)
    assert got.overhead_ms == pytest.approx(TRUE["overhead"][0] * (len(steps) + 1), rel=1e-6)
    parts = got.preprocess_ms + got.vision_ms + got.prefill_ms + got.decode_ms + got.overhead_ms
    assert got.total_ms == pytest.approx(parts, rel=1e-12)
    with pytest.raises(ValueError, match="n_output_tokens"):
        exact.predict(plan, n_crops, prompt, -1, image_pixels=0)


def test_predict_is_fast(exact: LatencyEstimator) -> None:
    plan = Plan(12, 6, 15, insert_pos=2)
    calls = 2000
    seconds = (
        min(timeit.repeat(lambda: exact.predict(plan, 13, 1900, 64, image_pixels=1280 * 720), number=calls, repeat=3))
        / calls
    )
    assert seconds < 50e-6


# -- persistence --------------------------------------------------------------------------------------


def test_dict_and_file_round_trip(exact: LatencyEstimator, tmp_path: Path) -> None:
    d = exact.to_dict()
    json.dumps(d, allow_nan=False)
    assert LatencyEstimator.from_dict(json.loads(json.dumps(d))) == exact
    assert set(d["metadata"]) == {"device", "model_fingerprint", "n_rows", "fitted_at"}
    path = exact.save(tmp_path / "sub" / "estimator.json")
    assert LatencyEstimator.load(path) == exact


def test_bad_files_name_the_file_and_the_key(exact: LatencyEstimator, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match=r"garbage\.json: not a JSON latency estimator"):
        LatencyEstimator.load(garbage)
    for key, edit in [
        ("stages.prefill.coef", lambda d: d["stages"]["prefill"].pop("coef")),
        ("metadata.device", lambda d: d["metadata"].pop("device")),
        ("knob_space", lambda d: d.pop("knob_space")),
    ]:
        d = exact.to_dict()
        edit(d)
        path = tmp_path / f"missing_{key}.json"
        path.write_text(json.dumps(d))
        with pytest.raises(ValueError) as err:
            LatencyEstimator.load(path)
        assert str(path) in str(err.value) and f"missing key '{key}'" in str(err.value)
    d = exact.to_dict()
    d["stages"]["decode"]["features"] = ["1", "B"]
    path = tmp_path / "old_features.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"old_features\.json: 'stages\.decode\.features'"):
        LatencyEstimator.load(path)
    with pytest.raises(FileNotFoundError):
        LatencyEstimator.load(tmp_path / "absent.json")


# -- evaluation ---------------------------------------------------------------------------------------


def test_evaluate_matches_hand_computed_metrics() -> None:
    rows = [
        make_record(doc_id=1, max_crops=3, n_crops=2, preprocess_ms=2.5, vision_ms=1.0, prefill_ms=8.0,
                 decode_ms=[2.0, 2.5], total_ms=16.5),
        make_record(doc_id=2, max_crops=12, n_crops=4, preprocess_ms=3.0, vision_ms=2.0, prefill_ms=12.0,
                 decode_ms=[1.0], total_ms=18.5),
    ]  # fmt: skip
    ev = evaluate(hand_estimator(), rows)
    assert (ev["n_rows"], ev["n_samples"]) == (2, 2)
    prefill = ev["all"]["all"]["prefill"]  # predicted 10, 10 against 8, 12
    assert prefill == pytest.approx(
        {
            "n": 2,
            "mae_ms": 2.0,
            "rmse_ms": 2.0,
            "mape_pct": (2 / 8 + 2 / 12) / 2 * 100,
            "mdape_pct": (2 / 8 + 2 / 12) / 2 * 100,
            "r2": 0.0,
        }
    )
    decode = ev["all"]["all"]["decode"]  # predicted 2 per step against 2, 2.5, 1
    mean = (2.0 + 2.5 + 1.0) / 3
    assert decode == pytest.approx(
        {
            "n": 3,
            "mae_ms": (0 + 0.5 + 1) / 3,
            "rmse_ms": math.sqrt((0 + 0.25 + 1) / 3),
            "mape_pct": (0 + 0.5 / 2.5 + 1 / 1) / 3 * 100,
            "mdape_pct": 0.5 / 2.5 * 100,
            "r2": 1 - 1.25 / ((2 - mean) ** 2 + (2.5 - mean) ** 2 + (1 - mean) ** 2),
        }
    )
    total = ev["all"]["all"]["total"]  # predicted 2+1+10+2*2 = 17 and 4+1+10+2 = 17
    assert total["mae_ms"] == pytest.approx((0.5 + 1.5) / 2)
    assert total["mape_pct"] == pytest.approx((0.5 / 16.5 + 1.5 / 18.5) / 2 * 100)
    tier3 = ev["by_max_crops"]["3"]
    assert tier3["prefill"] == pytest.approx(
        {"n": 1, "mae_ms": 2.0, "rmse_ms": 2.0, "mape_pct": 25.0, "mdape_pct": 25.0, "r2": None}
    )
    assert tier3["decode"]["n"] == 2 and ev["by_max_crops"]["12"]["decode"]["n"] == 1
    assert set(ev["by_top_k"]) == {"8"} and set(ev["by_n_blocks"]) == {"16"}
    table = format_evaluation(ev, "tiny")
    assert "max_crops=12" in table and "prefill" in table
    with pytest.raises(ValueError, match="no profile rows"):
        evaluate(hand_estimator(), [])


def test_split_rows_keeps_samples_whole_and_is_deterministic(exact_rows: list[RequestRecord]) -> None:
    train, held = split_rows(exact_rows, 0.25, seed=3)
    samples = {(r.task, r.doc_id) for r in exact_rows}
    train_samples, held_samples = {(r.task, r.doc_id) for r in train}, {(r.task, r.doc_id) for r in held}
    assert not train_samples & held_samples
    assert train_samples | held_samples == samples and len(train) + len(held) == len(exact_rows)
    assert len(held_samples) == round(0.25 * len(samples))
    assert split_rows(exact_rows, 0.25, seed=3) == (train, held)
    assert split_rows(exact_rows, 0.0, seed=3) == (list(exact_rows), [])
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_rows(exact_rows, 1.0)
    with pytest.raises(ValueError, match="cannot hold out"):
        split_rows(exact_rows[:1], 0.5)


# -- plots and CLI ------------------------------------------------------------------------------------


def test_plot_evaluation_writes_pngs(exact: LatencyEstimator, exact_rows: list[RequestRecord], tmp_path: Path) -> None:
    paths = plot_evaluation(exact, exact_rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["predicted_vs_measured.png", "relative_error.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_cli_fit_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir()
    rows = synthetic_rows(n_samples=10, plans_per_sample=6, noise=0.01, seed=4)
    write_profile(profile_dir, rows, KNOBS)
    out = tmp_path / "est.json"
    assert main(["fit", str(profile_dir), "--out", str(out), "--holdout", "0.2", "--seed", "1"]) == 0
    assert "held-out evaluation: " in capsys.readouterr().out
    assert LatencyEstimator.load(out).n_rows < len(rows)
    assert (tmp_path / "est_plots" / "predicted_vs_measured.png").is_file()
    assert main(["evaluate", str(out), str(profile_dir)]) == 0
    assert f"evaluation of {out}: {len(rows)} rows" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "absent.json"), str(profile_dir)]) == 1
