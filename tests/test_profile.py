"""Profiling sweeps (resumable rows scored by the task's own scorer), the grid, and block importance."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_records import make_record

from lmms_adaptive.core.plan import Plan
from lmms_adaptive.integration.tasks import TaskSample, load_samples
from lmms_adaptive.tools import profile

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


@pytest.fixture(scope="module")
def samples(lmms_env) -> list[TaskSample]:
    return load_samples(["synth_pope_test", "synth_vqa_test"], [str(TASKS_DIR)], limit=2, seed=0)


PLANS = [Plan(3, 4, 6), Plan(12, 8, 8)]


# -- grid ---------------------------------------------------------------------------------------------


def test_parse_grid_and_errors() -> None:
    assert profile.parse_grid("max_crops=3,12; top_k=4") == {"max_crops": (3, 12), "top_k": (4,)}
    assert profile.parse_grid(None) == {}
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        profile.parse_grid("crops=3")
    with pytest.raises(ValueError, match="integers"):
        profile.parse_grid("top_k=a")


# -- sweep --------------------------------------------------------------------------------------------


def test_sweep_writes_one_scored_row_per_sample_and_plan(rt, samples, tmp_path: Path) -> None:
    path = profile.sweep(rt, samples, PLANS, tmp_path / "prof", max_new_tokens=8)
    assert path.name == "rows.parquet" and not profile.journals(tmp_path / "prof")  # all compacted away
    rows = profile.read_profile(tmp_path / "prof")
    assert len(rows) == len(samples) * len(PLANS) == len({profile.row_key(r) for r in rows})
    for row in rows:
        sample = next(s for s in samples if (s.task, s.doc_id) == (row.task, row.doc_id))
        assert row.score == sample.score(row.answer)  # the task's own scorer on the recorded answer
        assert row.n_prompt_tokens == row.n_image_tokens + row.n_text_tokens
        assert row.model_fingerprint == rt.model_id
        assert row.total_ms >= row.facts_ms + row.controller_ms + row.vision_ms + row.prefill_ms + sum(row.decode_ms)
        assert row.controller == {"kind": "static", "plan": row.plan.to_dict()} and row.budget_ms is None
        assert row.n_output_tokens <= row.max_new_tokens
    by_plan = {r.plan: r for r in rows if r.task == "synth_vqa_test"}
    assert by_plan[PLANS[0]].n_crops < by_plan[PLANS[1]].n_crops


def test_repeats_record_the_median_of_each_stage(rt, samples, monkeypatch) -> None:
    from lmms_adaptive.core.runtime import Timings

    generate = rt.generate
    totals = iter([30.0, 10.0, 20.0])

    def timed(*args, **kwargs):
        out = generate(*args, **kwargs)
        total = next(totals)
        out.timings = Timings(
            preprocess_ms=1.0, vision_ms=total / 10, prefill_ms=total / 5,
            decode_ms=[total / 100] * len(out.timings.decode_ms), total_ms=total,
        )  # fmt: skip
        return out

    monkeypatch.setattr(rt, "generate", timed)
    row = profile.measure(rt, samples[0], PLANS[0], 3, "auto", repeats=3)
    assert (row.repeats, row.vision_ms, row.prefill_ms) == (3, 2.0, 4.0)
    assert row.decode_ms == [0.2] * len(row.decode_ms)


def test_interrupted_sweep_resumes_without_duplicates_or_losses(rt, samples, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "prof"
    real_measure = profile.measure
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(profile, "measure", flaky)
    with pytest.raises(KeyboardInterrupt):
        profile.sweep(rt, samples, PLANS, out, max_new_tokens=4)
    assert len(profile.read_profile(out)) == 3  # rows before the interrupt were kept (and compacted)
    monkeypatch.setattr(profile, "measure", real_measure)
    measured = []
    monkeypatch.setattr(profile, "measure", lambda *a, **k: measured.append(a[2]) or real_measure(*a, **k))
    profile.sweep(rt, samples, PLANS, out, max_new_tokens=4)
    rows = profile.read_profile(out)
    assert len(measured) == len(samples) * len(PLANS) - 3
    assert len(rows) == len({profile.row_key(r) for r in rows}) == len(samples) * len(PLANS)


def test_journal_with_a_torn_last_line_is_readable(tmp_path: Path) -> None:
    row = make_record(plan=Plan(3, 4, 6), decode_ms=[1.0, 1.0], total_ms=8.0)
    (tmp_path / "journal.jsonl").write_text(row.to_json() + "\n" + '{"task": "x", "doc')
    assert profile.read_profile(tmp_path) == [row]
    with pytest.raises(FileNotFoundError, match="no profile rows"):
        profile.read_profile(tmp_path / "empty")


def test_parquet_round_trips_every_field(rt, tmp_path: Path) -> None:
    rows = [
        make_record(
            plan=Plan(3, 4, 6, renormalize=True), decode_ms=[1.0, 2.5], controller={"kind": "static", "x": [1]}
        ),
        make_record(doc_id=1, budget_ms=50.0, violated=True, score=None, decode_ms=[], question_type="read"),
    ]
    store = profile.ProfileStore(tmp_path, rows[0].model_fingerprint, rt.knobs)
    for row in rows:
        store.append(row)
    store.compact()
    assert not profile.journals(tmp_path)  # every row is in rows.parquet
    assert profile.read_profile(tmp_path) == rows
    assert profile.profile_knobs(tmp_path) == rt.knobs


def test_a_profile_folder_holds_one_model(rt, tmp_path: Path) -> None:
    profile.ProfileStore(tmp_path, "model-a", rt.knobs).close()
    with pytest.raises(ValueError, match="holds a profile of model model-a, not of the loaded model model-b"):
        profile.ProfileStore(tmp_path, "model-b", rt.knobs)
    with pytest.raises(FileNotFoundError, match="profile.json is missing"):
        profile.profile_knobs(tmp_path / "elsewhere")
