"""The offline ``*_local`` lmms-eval tasks under ``tasks/`` load and agree with the official scorers.

Everything runs offline against the committed parquet fixtures; no model is involved.
lmms-eval is imported lazily inside the fixture so the offline environment is in place first.
"""

from __future__ import annotations

import collections
import importlib.util
import os
from pathlib import Path

import pytest

from lmms_adaptive.integration.tasks import DecodedDocs, TaskSample, load_samples

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tasks"

# task name -> (split, number of docs, built-in YAML it mirrors)
EXPECTED = {
    "textvqa_val_local": ("validation", 12, "textvqa/textvqa_val.yaml"),
    "mme_local": ("test", 24, "mme/mme.yaml"),
    "pope_local": ("test", 12, "pope/pope.yaml"),
}
IMAGE_SIZES = {(320, 240), (640, 480), (800, 600), (480, 900), (1024, 384)}


@pytest.fixture(scope="module")
def task_manager(lmms_env):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)


@pytest.fixture(scope="module")
def tasks(task_manager):
    from lmms_eval.tasks import get_task_dict

    return get_task_dict(list(EXPECTED), task_manager)


def docs_of(task):
    split, _, _ = EXPECTED[task.config.task]
    return [task.dataset[split][i] for i in range(len(task.dataset[split]))]


def score_all(task, answer_fn):
    """Run the task's own process_results on every doc; return {metric: [per-doc values]}."""
    per_metric = collections.defaultdict(list)
    for doc in docs_of(task):
        for metric, value in task.process_results(doc, [answer_fn(doc)]).items():
            per_metric[metric].append(value)
    return per_metric


def aggregate(task, per_metric):
    agg = task.aggregation()
    return {m: agg[m](vals) for m, vals in per_metric.items() if m != "submission"}


# --------------------------------------------------------------------------- discovery and building


def test_task_manager_finds_local_tasks(task_manager):
    for name in EXPECTED:
        assert name in task_manager.all_subtasks, name
        assert Path(task_manager.task_index[name]["yaml_path"]).parent == TASKS_DIR
    assert set(task_manager.task_index["adaptive_local"]["task"]) == set(EXPECTED)


def test_tasks_build_offline(tasks, lmms_env):
    from PIL import Image

    assert set(tasks) == set(EXPECTED)
    assert Path.cwd() == lmms_env  # built from a foreign cwd: relative data_files were resolved
    for name, task in tasks.items():
        split, n_docs, _ = EXPECTED[name]
        assert task.config.test_split == split
        data_file = task.config.dataset_kwargs["data_files"][split]
        assert os.path.isabs(data_file) and Path(data_file).parent == TASKS_DIR
        assert len(task.eval_docs) == n_docs, name
        sizes = set()
        for doc in docs_of(task):
            visuals = task.doc_to_visual(doc)
            assert isinstance(visuals, list) and len(visuals) == 1
            assert isinstance(visuals[0], Image.Image) and visuals[0].mode == "RGB"
            sizes.add(visuals[0].size)
            text = task.doc_to_text(doc)
            assert isinstance(text, str) and text.endswith("\nAnswer the question using a single word or phrase.")
        assert sizes <= IMAGE_SIZES and len(sizes) >= 4, (name, sizes)


def test_local_yamls_mirror_builtin_configs(tasks):
    import lmms_eval
    from lmms_eval import utils
    from lmms_eval.tasks.mme import utils as mme_utils
    from lmms_eval.tasks.pope import utils as pope_utils
    from lmms_eval.tasks.textvqa import utils as textvqa_utils

    builtin_root = Path(lmms_eval.__file__).parent / "tasks"
    for name in tasks:
        builtin = utils.load_yaml_config(str(builtin_root / EXPECTED[name][2]), mode="simple")
        ours = utils.load_yaml_config(str(TASKS_DIR / f"{name}.yaml"), mode="simple")
        for key in ("output_type", "doc_to_target", "generation_kwargs", "lmms_eval_specific_kwargs", "test_split"):
            assert ours[key] == builtin[key], (name, key)
        assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in builtin["metric_list"]]

    # the scorer functions are the built-in module's own objects (absolute imports)
    assert tasks["textvqa_val_local"].config.process_results is textvqa_utils.textvqa_process_results
    assert tasks["mme_local"].config.process_results is mme_utils.mme_process_results
    assert tasks["pope_local"].config.process_results is pope_utils.pope_process_results
    assert tasks["mme_local"].config.doc_to_text is mme_utils.mme_doc_to_text


# --------------------------------------------------------------------------- data structure


def test_fixture_structure(tasks):
    from lmms_eval.tasks.mme.utils import eval_type_dict

    tv = docs_of(tasks["textvqa_val_local"])
    assert len({d["question_id"] for d in tv}) == len(tv)
    for d in tv:
        assert len(d["answers"]) == 10 and all(isinstance(a, str) and a for a in d["answers"])
        assert d["ocr_tokens"] and isinstance(d["image_id"], str)
        assert (d["image_width"], d["image_height"]) == d["image"].size

    mme = docs_of(tasks["mme_local"])
    by_qid = collections.defaultdict(list)
    for d in mme:
        by_qid[d["question_id"]].append(d)
    assert len(by_qid) == 12
    cats = set()
    for qid, rows in by_qid.items():
        assert sorted(r["answer"] for r in rows) == ["No", "Yes"], qid
        assert len({r["category"] for r in rows}) == 1
        cats.add(rows[0]["category"])
        assert all(r["question"].endswith(" Please answer yes or no.") for r in rows)
    assert cats & set(eval_type_dict["Perception"]) and cats & set(eval_type_dict["Cognition"])
    assert cats <= set(eval_type_dict["Perception"]) | set(eval_type_dict["Cognition"])

    pope = docs_of(tasks["pope_local"])
    assert collections.Counter(d["answer"] for d in pope) == {"yes": 6, "no": 6}
    assert len({d["question_id"] for d in pope}) == len(pope)


# --------------------------------------------------------------------------- official scorers


def test_textvqa_scores(tasks, lmms_env):
    from lmms_eval.tasks.textvqa.utils import textvqa_aggregate_submissions

    task = tasks["textvqa_val_local"]
    best = lambda d: collections.Counter(d["answers"]).most_common(1)[0][0]  # noqa: E731
    right = score_all(task, best)
    assert right["exact_match"] == [1.0] * 12
    assert aggregate(task, right)["exact_match"] == 1.0
    wrong = score_all(task, lambda d: "zebra crossing")
    assert wrong["exact_match"] == [0.0] * 12
    assert aggregate(task, wrong)["exact_match"] == 0.0

    # the built-in submission aggregation writes into the cwd when no output_path is known
    before = set((lmms_env / "submissions").glob("textvqa_submission_*.json"))  # other tests' runs share the cwd
    textvqa_aggregate_submissions(right["submission"], None)
    assert len(set((lmms_env / "submissions").glob("textvqa_submission_*.json")) - before) == 1


def test_pope_scores(tasks):
    task = tasks["pope_local"]
    right = aggregate(task, score_all(task, lambda d: d["answer"].capitalize()))
    assert right == {
        "pope_accuracy": 1.0,
        "pope_precision": 1.0,
        "pope_recall": 1.0,
        "pope_f1_score": 1.0,
        "pope_yes_ratio": 0.5,
    }
    flip = {"yes": "no", "no": "yes"}
    wrong = aggregate(task, score_all(task, lambda d: flip[d["answer"]]))
    assert wrong["pope_accuracy"] == 0.0 and wrong["pope_f1_score"] == 0.0


def test_mme_scores(tasks):
    from lmms_eval.tasks.mme.utils import eval_type_dict

    task = tasks["mme_local"]
    cats = {d["category"] for d in docs_of(task)}
    n_perception = len(cats & set(eval_type_dict["Perception"]))
    n_cognition = len(cats & set(eval_type_dict["Cognition"]))
    assert n_cognition == 4  # all MME cognition categories: 800 is the real maximum

    right = aggregate(task, score_all(task, lambda d: d["answer"]))
    # 200 per category (acc + acc_plus); the real MME maxima are 2000 / 800
    assert right == {"mme_perception_score": 200.0 * n_perception, "mme_cognition_score": 800.0}
    flip = {"Yes": "No", "No": "Yes"}
    wrong = aggregate(task, score_all(task, lambda d: flip[d["answer"]]))
    assert wrong == {"mme_perception_score": 0.0, "mme_cognition_score": 0.0}


# --------------------------------------------------------------------------- regeneration


def test_make_fixtures_regenerates_same_content(tmp_path, lmms_env):
    import pyarrow.parquet as pq

    spec = importlib.util.spec_from_file_location("make_fixtures", TASKS_DIR / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(str(tmp_path))
    for name in EXPECTED:
        committed = TASKS_DIR / f"{name}.parquet"
        fresh = tmp_path / f"{name}.parquet"
        assert committed.stat().st_size < 200_000
        assert pq.read_table(fresh).equals(pq.read_table(committed)), (
            f"{committed.name} is stale: run python tasks/make_fixtures.py"
        )


@pytest.fixture(scope="module")
def synth_samples(lmms_env) -> list[TaskSample]:
    return load_samples(["synth_pope_test", "synth_vqa_test"], [str(TASKS_DIR)], limit=2, seed=0)


def test_samples_are_the_tasks_own_requests(synth_samples: list[TaskSample]) -> None:
    assert [s.task for s in synth_samples] == ["synth_pope_test"] * 2 + ["synth_vqa_test"] * 2
    pope = synth_samples[0]
    assert pope.context.endswith("Answer the question using a single word or phrase.")
    assert len(pope.images) == 1
    truth = pope.doc["answer"].strip().lower()
    assert pope.score(truth) == 1.0 and pope.score("no" if truth == "yes" else "yes") == 0.0
    vqa = synth_samples[2]
    assert vqa.score(vqa.doc["answers"][0]) == 1.0 and vqa.score("zzz") == 0.0


def test_docs_are_decoded_when_used_and_only_the_recent_ones_kept() -> None:
    decoded = []

    class Rows:
        def __getitem__(self, i: int) -> dict:
            decoded.append(i)
            return {"image": f"img{i}"}

    docs = DecodedDocs(Rows(), lambda doc: [doc["image"], None], keep=2)
    assert docs[0] == ({"image": "img0"}, ["img0"]) and docs[0][1] == ["img0"]  # None visuals dropped
    docs[1], docs[0], docs[2]  # 2 pushes out 1, the least recently used
    assert decoded == [0, 1, 2] and list(docs._recent) == [0, 2]
    docs[1]
    assert decoded == [0, 1, 2, 1] and list(docs._recent) == [2, 1]


def test_limit_draws_a_seeded_subset(lmms_env) -> None:
    first = load_samples(["synth_pope_test"], [str(TASKS_DIR)], limit=3, seed=1)
    again = load_samples(["synth_pope_test"], [str(TASKS_DIR)], limit=3, seed=1)
    other = load_samples(["synth_pope_test"], [str(TASKS_DIR)], limit=3, seed=2)
    assert [s.doc_id for s in first] == [s.doc_id for s in again] != [s.doc_id for s in other]


def test_unknown_task_is_named(lmms_env) -> None:
    with pytest.raises(ValueError, match="no_such_task"):
        load_samples(["no_such_task"], [str(TASKS_DIR)], limit=1, seed=0)
