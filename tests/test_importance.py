"""Block importance: the ranking, the importance file the runtime reads, and the schedule it drives."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmms_adaptive.core.checkpoint import IMPORTANCE_FILE, read_drop_order
from lmms_adaptive.core.plan import KnobSpace, Plan
from lmms_adaptive.integration.tasks import TaskSample, load_samples
from lmms_adaptive.tools import importance

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


@pytest.fixture(scope="module")
def samples(lmms_env) -> list[TaskSample]:
    return load_samples(["synth_vqa_test"], [str(TASKS_DIR)], limit=2, seed=0)


def test_ranking_orders_least_important_first() -> None:
    assert importance.ranking([0.5, 0.1, 0.3, 0.1], None) == [3, 1, 2, 0]  # ties: deeper first
    assert importance.ranking([0.5, 0.1, 0.3, 0.2], [0.0, 0.2, -0.1, 0.2]) == [
        2,
        0,
        1,
        3,
    ]  # drop ties: smaller cosine first


def test_importance_file_is_read_by_the_runtime(rt, samples, tmp_path: Path) -> None:
    result = importance.importance(rt, samples[:1], with_drop_score=False, max_new_tokens=4)
    n = rt.knobs.n_layers
    assert sorted(result.drop_order) == list(range(n)) and len(result.cosine) == n
    assert all(0.0 <= c <= 2.0 for c in result.cosine)
    result.save(tmp_path / IMPORTANCE_FILE)
    assert importance.BlockImportance.load(tmp_path / IMPORTANCE_FILE) == result
    assert read_drop_order(tmp_path, rt.model_id) == tuple(result.drop_order)
    assert read_drop_order(tmp_path, "another-model") is None
    (tmp_path / IMPORTANCE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="drop_order"):
        read_drop_order(tmp_path, rt.model_id)


def test_drop_scores_measure_each_block(rt, samples) -> None:
    drops = importance.block_drop_scores(rt, samples[:2], max_new_tokens=4)
    assert len(drops) == rt.knobs.n_layers
    assert all(-1.0 <= d <= 1.0 for d in drops)


def test_schedule_follows_the_drop_order(rt) -> None:
    knobs = KnobSpace.from_config(rt.model.config)
    order = (3, 5, 1, 2, 4, 6, 7, 0)
    schedule = knobs.schedule(Plan(12, 8, knobs.min_blocks), order)
    assert set(range(knobs.n_layers)) - set(schedule.blocks) == {3, 5}
