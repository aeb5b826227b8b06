"""Profiling sweeps (resumable rows scored by the task's own scorer), the grid, and block importance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmms_adaptive import profile
from lmms_adaptive.plan import KnobSpace, Plan
from lmms_adaptive.records import ProfileRow
from lmms_adaptive.runtime import IMPORTANCE_FILE, AdaptiveMolmoe, GenerationConfig, read_drop_order

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


@pytest.fixture(scope="module")
def rt() -> AdaptiveMolmoe:
    return AdaptiveMolmoe.from_pretrained(None, device="cpu")


@pytest.fixture(scope="module")
def samples(lmms_env) -> list[profile.TaskSample]:
    return profile.load_samples(["synth_pope_test", "synth_vqa_test"], [str(TASKS_DIR)], limit=2, seed=0)


PLANS = [Plan(3, 4, 6), Plan(12, 8, 8)]


# -- grid ---------------------------------------------------------------------------------------------


def test_parse_grid_and_errors() -> None:
    assert profile.parse_grid("max_crops=3,12; top_k=4") == {"max_crops": (3, 12), "top_k": (4,)}
    assert profile.parse_grid(None) == {}
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        profile.parse_grid("crops=3")
    with pytest.raises(ValueError, match="integers"):
        profile.parse_grid("top_k=a")


def test_default_grid_covers_the_plan_space_once(rt: AdaptiveMolmoe) -> None:
    knobs = rt.knobs
    plans = profile.grid_plans(knobs)
    assert len(plans) == len(set(plans))
    for plan in plans:
        knobs.validate(plan)
    assert set(knobs.plans()) <= set(plans)  # every insert_pos=1 plan
    assert {p.insert_pos for p in plans} == set(knobs.insert_positions)
    narrowed = profile.grid_plans(knobs, {"max_crops": (3,), "top_k": (4, 8), "insert_pos": (1,)})
    assert {(p.max_crops, p.top_k) for p in narrowed} == {(3, 4), (3, 8)}
    with pytest.raises(ValueError, match="not in the model's knob space"):
        profile.grid_plans(knobs, {"top_k": (3,)})


# -- samples and scores -------------------------------------------------------------------------------


def test_samples_are_the_tasks_own_requests(samples: list[profile.TaskSample]) -> None:
    assert [s.task for s in samples] == ["synth_pope_test"] * 2 + ["synth_vqa_test"] * 2
    pope = samples[0]
    assert pope.context.endswith("Answer the question using a single word or phrase.")
    assert len(pope.images) == 1
    truth = pope.doc["answer"].strip().lower()
    assert pope.score(truth) == 1.0 and pope.score("no" if truth == "yes" else "yes") == 0.0
    vqa = samples[2]
    assert vqa.score(vqa.doc["answers"][0]) == 1.0 and vqa.score("zzz") == 0.0


def test_limit_draws_a_seeded_subset(lmms_env) -> None:
    first = profile.load_samples(["synth_pope_test"], [str(TASKS_DIR)], limit=3, seed=1)
    again = profile.load_samples(["synth_pope_test"], [str(TASKS_DIR)], limit=3, seed=1)
    other = profile.load_samples(["synth_pope_test"], [str(TASKS_DIR)], limit=3, seed=2)
    assert [s.doc_id for s in first] == [s.doc_id for s in again] != [s.doc_id for s in other]


def test_unknown_task_is_named(lmms_env) -> None:
    with pytest.raises(ValueError, match="no_such_task"):
        profile.load_samples(["no_such_task"], [str(TASKS_DIR)], limit=1, seed=0)


# -- sweep --------------------------------------------------------------------------------------------


def test_sweep_writes_one_scored_row_per_sample_and_plan(rt, samples, tmp_path: Path) -> None:
    path = profile.sweep(rt, samples, PLANS, tmp_path / "prof", max_new_tokens=8)
    assert path.name == "rows.parquet" and not (tmp_path / "prof" / "journal.jsonl").read_text()
    rows = profile.read_profile(tmp_path / "prof")
    assert len(rows) == len(samples) * len(PLANS) == len({r.key for r in rows})
    for row in rows:
        sample = next(s for s in samples if (s.task, s.doc_id) == (row.task, row.doc_id))
        assert row.score == sample.score(row.answer)  # the task's own scorer on the recorded answer
        assert row.n_prompt_tokens == row.n_image_tokens + row.n_text_tokens
        assert row.model_fingerprint == rt.model_id
        assert row.total_ms >= row.vision_ms + row.prefill_ms + sum(row.decode_ms)
        assert row.n_output_tokens <= row.max_new_tokens
    by_plan = {r.plan: r for r in rows if r.task == "synth_vqa_test"}
    assert by_plan[PLANS[0]].n_crops < by_plan[PLANS[1]].n_crops


def test_repeats_record_the_median_of_each_stage(rt, samples, monkeypatch) -> None:
    from lmms_adaptive.runtime import Timings

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
    gen = GenerationConfig(max_new_tokens=3, stop_at_eos=False)
    row = profile.measure(rt, samples[0], PLANS[0], gen, "auto", repeats=3)
    assert (row.repeats, row.total_ms, row.vision_ms, row.prefill_ms, row.decode_ms) == (3, 20.0, 2.0, 4.0, [0.2, 0.2])


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
    assert len(rows) == len({r.key for r in rows}) == len(samples) * len(PLANS)


def test_journal_with_a_torn_last_line_is_readable(tmp_path: Path) -> None:
    row = _row()
    (tmp_path / "journal.jsonl").write_text(json.dumps(row.__dict__) + "\n" + '{"task": "x", "doc')
    assert profile.read_profile(tmp_path) == [row]
    with pytest.raises(FileNotFoundError, match="no profile rows"):
        profile.read_profile(tmp_path / "empty")


# -- importance ---------------------------------------------------------------------------------------


def test_ranking_orders_least_important_first() -> None:
    assert profile.ranking([0.5, 0.1, 0.3, 0.1], None) == [3, 1, 2, 0]  # ties: deeper first
    assert profile.ranking([0.5, 0.1, 0.3, 0.2], [0.0, 0.2, -0.1, 0.2]) == [2, 0, 1, 3]  # drop ties: smaller cosine first


def test_importance_file_is_read_by_the_runtime(rt, samples, tmp_path: Path) -> None:
    result = profile.importance(rt, samples[:1], with_drop_score=False, max_new_tokens=4)
    n = rt.knobs.n_layers
    assert sorted(result.drop_order) == list(range(n)) and len(result.cosine) == n
    assert all(0.0 <= c <= 2.0 for c in result.cosine)
    result.save(tmp_path / IMPORTANCE_FILE)
    assert profile.BlockImportance.load(tmp_path / IMPORTANCE_FILE) == result
    assert read_drop_order(tmp_path, rt.model_id) == tuple(result.drop_order)
    assert read_drop_order(tmp_path, "another-model") is None
    (tmp_path / IMPORTANCE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="drop_order"):
        read_drop_order(tmp_path, rt.model_id)


def test_drop_scores_measure_each_block(rt, samples) -> None:
    drops = profile.block_drop_scores(rt, samples[:2], max_new_tokens=4)
    assert len(drops) == rt.knobs.n_layers
    assert all(-1.0 <= d <= 1.0 for d in drops)


def test_schedule_follows_the_drop_order(rt) -> None:
    knobs = KnobSpace.from_config(rt.model.config)
    order = (3, 5, 1, 2, 4, 6, 7, 0)
    schedule = knobs.schedule(Plan(12, 8, knobs.min_blocks), order)
    assert set(range(knobs.n_layers)) - set(schedule.blocks) == {3, 5}


def _row() -> ProfileRow:
    return ProfileRow(
        task="t", doc_id=0, split="test", max_crops=3, top_k=4, n_blocks=6, insert_pos=1, renormalize=False,
        n_crops=3, n_image_tokens=100, n_text_tokens=20, n_prompt_tokens=120, n_output_tokens=2, max_new_tokens=8,
        preprocess_ms=1.0, vision_ms=2.0, prefill_ms=3.0, decode_ms=[1.0, 1.0], total_ms=8.0, score=1.0,
        answer="yes", stop_reason="eos", device="cpu", model_fingerprint="m",
    )  # fmt: skip
