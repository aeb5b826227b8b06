"""The lmms-eval plugin: the mission CLI on the tiny default, built-in task configs, model_args errors, records."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_records import make_record

from lmms_adaptive.controllers.static import static_artifact
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.serving.records import RecordWriter, RequestRecord, read_records, summarize
from lmms_adaptive.tools.results import latest_results, task_metrics

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
LOCAL_TASKS = ("textvqa_val_local", "mme_local", "pope_local")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    env = {**OFFLINE, "HF_HOME": str(tmp_path_factory.mktemp("hf"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {**os.environ}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def lmm_class(offline_env):
    from lmms_adaptive.integration.lmms_plugin import AdaptiveMolmoeLMM

    return AdaptiveMolmoeLMM


def make_lmm(lmm_class, args: str):
    return lmm_class.create_from_arg_string(args + ",warmup=false", {"batch_size": 1})


@pytest.mark.slow
def test_mission_cli_on_tiny_default(offline_env, tmp_path):
    """The mission's command, as a subprocess; checks the files, since the CLI exits 0 on errors."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "adaptive_molmoe",
        "--model_args", "controller=static,tier=low,top_k=6,blocks=7,budget=250",
        "--include_path", str(TASKS), "--tasks", ",".join(LOCAL_TASKS),
        "--output_path", str(out), "--log_samples", "--limit", "4", "--gen_kwargs", "max_new_tokens=4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, results = latest_results(out)
    for task in LOCAL_TASKS:
        assert task_metrics(results, task), f"no metrics for {task}: {proc.stderr[-3000:]}"
        assert list(out.rglob(f"*_samples_{task}.jsonl")), task
    throughput = results["throughput"]
    table = proc.stdout[proc.stdout.index("Throughput Summary") :]
    for name in ("avg_latency_mean_ms", "avg_latency_p95_ms", "avg_budget_violation_pct"):
        assert re.search(rf"^\|{name}\s*\|", table, re.MULTILINE), table  # lmms-eval's table, units in the names

    (record_file,) = (out / "adaptive_molmoe").glob("*.jsonl")
    records = read_records(record_file)
    assert len(records) == 12  # 4 docs x 3 tasks, one record per request
    assert {r.task for r in records} == set(LOCAL_TASKS)
    for r in records:
        assert r.plan == Plan(max_crops=3, top_k=6, n_blocks=7, insert_pos=1)
        assert r.budget_ms == 250.0
        assert r.violated == (r.total_ms > 250.0)
        assert r.n_output_tokens <= 4
        stages = r.facts_ms + r.controller_ms + r.preprocess_ms + r.vision_ms + r.prefill_ms + sum(r.decode_ms)
        assert r.total_ms >= stages
    summary = json.loads(record_file.with_suffix(".summary.json").read_text())
    assert summary["overall"]["n_requests"] == 12
    assert summary["overall"]["latency_p95_ms"] == pytest.approx(summarize(records)["latency_p95_ms"])
    stats = summarize(records)  # one generate_until call: lmms-eval's averages are this call's numbers
    assert throughput["avg_latency_mean_ms"] == pytest.approx(stats["latency_mean_ms"])
    assert throughput["avg_latency_p95_ms"] == pytest.approx(stats["latency_p95_ms"])
    assert throughput["avg_budget_violation_pct"] == pytest.approx(100 * stats["violation_rate"])

    # lmms-eval's own efficiency section and per-sample token counts, from the answers' GenerationResult
    counted = {
        (r.task, r.doc_id): {"input_tokens": r.n_prompt_tokens, "output_tokens": r.n_output_tokens} for r in records
    }
    for task in LOCAL_TASKS:
        (samples_file,) = out.rglob(f"*_samples_{task}.jsonl")
        for line in samples_file.read_text().splitlines():
            sample = json.loads(line)
            assert sample["token_counts"] == [counted[(task, sample["doc_id"])]]
        per_task = results["efficiency"]["by_task"][task]
        assert per_task["docs_with_token_counts"] == 4
        assert per_task["total_input_tokens"] == sum(r.n_prompt_tokens for r in records if r.task == task)
    overall = results["efficiency"]["overall"]
    assert overall["total_input_tokens"] == sum(r.n_prompt_tokens for r in records) > 12 * 100  # image tokens in
    assert overall["total_output_tokens"] == sum(r.n_output_tokens for r in records) > 0


@pytest.mark.slow
def test_builtin_task_configs_on_local_parquet(lmm_class, tmp_path, monkeypatch):
    """The official textvqa_val / mme / pope configs and scorers, pointed at our local parquet files."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # textvqa's aggregation writes submissions/ into the cwd
    lmm = make_lmm(lmm_class, f"controller=static,tier=low,max_new_tokens=3,log_dir={tmp_path / 'records'}")
    tasks = [
        {"task": "textvqa_val", "dataset_path": "parquet",
         "dataset_kwargs": {"data_files": {"validation": str(TASKS / "textvqa_val_local.parquet")}}},
        {"task": "mme", "dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": str(TASKS / "mme_local.parquet")}}},
        {"task": "pope", "dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": str(TASKS / "pope_local.parquet")}}},
    ]  # fmt: skip
    results = simple_evaluate(
        model=lmm, tasks=tasks, limit=4, task_manager=TaskManager(), bootstrap_iters=0, datetime_str=str(time.time())
    )
    for task in ("textvqa_val", "mme", "pope"):
        assert task_metrics(results, task), task
    records = read_records(next((tmp_path / "records").glob("*.jsonl")))
    assert sorted({r.task for r in records}) == ["mme", "pope", "textvqa_val"]
    assert all(r.budget_ms is None and r.violated is None for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("colour=red", "unknown model_args colour"),
        ("budget=0", "budget must be a finite positive number"),
        ("budget=-1", "budget must be a finite positive number"),
        ("top_k=9", "top_k must be an integer in 1..8"),
        ("top_k=0", "top_k must be an integer in 1..8"),
        ("tier=ultra", "tier must be one of low, medium, high"),
        ("tier=low,max_crops=4", "either tier or max_crops"),
        ("blocks=3", "blocks must be in 6..8"),
        ("insert_pos=3,blocks=6", "blocks must be in 8..8 for insert_pos 3"),
        ("insert_pos=9", "insert_pos must be one of [1, 2, 3]"),
        ("max_new_tokens=0", "max_new_tokens must be a positive integer"),
        ("pretrained=/no/such/folder", "pretrained='/no/such/folder': checkpoint folder not found"),
        ("controller=fancy", "controller must be one of static, lookup, grpo"),
        ("controller=lookup,top_k=4", "top_k only apply to controller=static"),
        ("dtype=int8", "dtype must be one of"),
        ("slowdown=maybe", "slowdown must be true or false"),
        ("compile=fast", "compile must be auto, on or off"),
    ],
)
def test_bad_model_args_name_the_problem(lmm_class, args, message):
    with pytest.raises(ValueError, match=None) as err:
        make_lmm(lmm_class, args)
    assert message in str(err.value)


def test_controller_artifact_for_another_model_is_refused(lmm_class, tmp_path):
    lmm = make_lmm(lmm_class, "controller=static")
    good = tmp_path / "static.json"
    good.write_text(json.dumps(static_artifact(Plan(3, 5, 7), lmm.rt.model_id, lmm.rt.knobs)))
    loaded = make_lmm(lmm_class, f"controller={good}")
    assert loaded.controller.plan == Plan(3, 5, 7)

    other = tmp_path / "other.json"
    other.write_text(json.dumps(static_artifact(Plan(3, 5, 7), "0123456789abcdef", lmm.rt.knobs)))
    with pytest.raises(ValueError, match="was made for model 0123456789abcdef"):
        make_lmm(lmm_class, f"controller={other}")


def test_grpo_artifacts_are_found_per_model_and_refused_for_another(lmm_class, tiny_dir, tmp_path):
    from lmms_adaptive.controllers.grpo import GRPOController, PolicyDims, TwoStagePolicy

    with pytest.raises(ValueError, match="no grpo artifact for this model"):
        make_lmm(lmm_class, f"pretrained={tiny_dir},controller=grpo,budget=100")
    lmm = make_lmm(lmm_class, "controller=static")
    policy = TwoStagePolicy(lmm.rt.knobs, PolicyDims(d_model=lmm.rt.model.config.d_model), (50.0, 500.0))
    good = tmp_path / "grpo.json"
    good.write_text(json.dumps(policy.to_artifact(lmm.rt.model_id)))
    with pytest.raises(ValueError, match=r"\(grpo\) decides per budget: give budget=<ms per request>"):
        make_lmm(lmm_class, f"controller={good}")
    loaded = make_lmm(lmm_class, f"controller={good},budget=120")
    assert isinstance(loaded.controller, GRPOController)
    assert loaded.controller.describe()["budget_range_ms"] == [50.0, 500.0]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(policy.to_artifact("0123456789abcdef")))
    with pytest.raises(ValueError, match="was made for model 0123456789abcdef"):
        make_lmm(lmm_class, f"controller={other},budget=120")


@pytest.mark.parametrize("kind", ["lookup", "grpo"])
def test_shipped_artifacts_are_made_for_the_shipped_default_model(lmm_class, kind):
    """controllers/ holds a lookup table and a trained grpo policy for the embedded default: a retrained
    default must come with new ones (their fingerprint is the model's)."""
    lmm = make_lmm(lmm_class, f"controller={kind},budget=150")
    assert lmm.controller.kind == kind


def test_batch_size_string_is_accepted_and_logged(lmm_class, caplog):
    lmm = lmm_class.create_from_arg_string("warmup=false", {"batch_size": "4"})
    assert lmm.rt is not None
    assert "batch size 1" in caplog.text


def test_generation_kwargs_and_styles():
    from lmms_adaptive.serving.request import generation_config, task_style

    gen = generation_config({"until": "ASSISTANT:", "temperature": 0}, 7)
    assert (gen.stop, gen.max_new_tokens, gen.do_sample) == (("ASSISTANT:",), 7, False)
    gen = generation_config(
        {"until": ["\n\n"], "max_new_tokens": 3, "temperature": 0.7, "do_sample": True, "top_p": 0.9}, 7
    )
    assert (gen.max_new_tokens, gen.do_sample, gen.temperature, gen.top_p) == (3, True, 0.7, 0.9)
    assert task_style("textvqa_val_local", "auto") == "text_vqa"
    assert task_style("pope", "auto") == "vqa2"
    assert task_style("unknown_task", "auto") is None
    assert task_style("textvqa_val", "none") is None
    assert task_style("textvqa_val", "doc_qa") == "doc_qa"


def _record(i: int) -> RequestRecord:
    total = 90.0 + 20 * (i % 2)
    return make_record(
        task="t", doc_id=i, budget_ms=100.0, plan=Plan(3, 8, 8), total_ms=total, violated=total > 100.0, score=None
    )


def test_killed_writer_leaves_whole_readable_lines(tmp_path):
    """A run killed mid-stream leaves only whole, flushed JSON lines."""
    path = tmp_path / "records.jsonl"
    script = (
        "import json, sys, time, dataclasses\n"
        "from pathlib import Path\n"
        "from lmms_adaptive.serving.records import RecordWriter, RequestRecord\n"
        f"base = RequestRecord.from_dict(json.loads({_record(0).to_json()!r}))\n"
        f"w = RecordWriter(Path({str(path)!r}))\n"
        "i = 0\n"
        "while True:\n"
        "    w.write(dataclasses.replace(base, doc_id=i)); i += 1; time.sleep(0.005)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and (not path.exists() or path.read_text().count("\n") < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) >= 5 and text.endswith("\n")
    assert [json.loads(line)["doc_id"] for line in lines] == list(range(len(lines)))


def test_summary_statistics():
    stats = summarize([_record(i) for i in range(10)])
    assert stats["n_requests"] == 10
    assert stats["latency_mean_ms"] == pytest.approx(100.0)
    assert stats["violation_rate"] == pytest.approx(0.5)
    assert stats["knobs"]["max_crops"] == {"3": 10}


def test_version_3_records_read_as_not_compiled(tmp_path):
    """Records written before the `compiled` field (version 3) still read, as eager requests."""
    old = {k: v for k, v in _record(0).to_dict().items() if k != "compiled"} | {"version": 3}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(old) + "\n" + _record(1).to_json() + "\n")
    first, second = read_records(path)
    assert first.compiled is False and first.version == second.version == 4
    with pytest.raises(ValueError, match="version 2"):
        RequestRecord.from_dict({**old, "version": 2})


def test_record_writer_appends(tmp_path):
    writer = RecordWriter(tmp_path / "r.jsonl")
    writer.write(_record(0))
    writer.close()
    writer = RecordWriter(tmp_path / "r.jsonl")
    writer.write(_record(1))
    writer.close()
    assert [r.doc_id for r in read_records(tmp_path / "r.jsonl")] == [0, 1]


def test_builtin_controller_names_find_this_models_artifact(tmp_path):
    from lmms_adaptive.controllers import find_artifact

    (tmp_path / "a_other.json").write_text(json.dumps({"kind": "lookup", "model_fingerprint": "other"}))
    (tmp_path / "b_broken.json").write_text("{not json")
    (tmp_path / "c_static.json").write_text(json.dumps({"kind": "static", "model_fingerprint": "mine"}))
    (tmp_path / "d_mine.json").write_text(json.dumps({"kind": "lookup", "model_fingerprint": "mine"}))
    assert find_artifact("lookup", "mine", [tmp_path / "missing", tmp_path]) == tmp_path / "d_mine.json"
    assert find_artifact("grpo", "mine", [tmp_path]) is None


def test_results_floors(tmp_path, capsys):
    from lmms_adaptive.tools.results import main as results_main

    (tmp_path / "x_results.json").write_text(
        json.dumps({"results": {"t": {"exact_match,none": 0.4, "exact_match_stderr,none": 0.1}}})
    )
    assert results_main([str(tmp_path), "--tasks", "t", "--floor", "t:exact_match=0.35"]) == 0
    assert results_main([str(tmp_path), "--tasks", "t", "--floor", "t:exact_match=0.45"]) == 1
    assert "t exact_match = 0.4000 < floor 0.45" in capsys.readouterr().err
    assert results_main([str(tmp_path), "--tasks", "t", "--floor", "t:accuracy=0.1"]) == 1
    assert "t has no metric 'accuracy'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        results_main([str(tmp_path), "--tasks", "t", "--floor", "t=0.1"])


def test_loglikelihood_is_served_and_recorded(lmm_class, tmp_path):
    """A loglikelihood request takes the one request path too: scored under the controller's plan, recorded."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    lmm = make_lmm(lmm_class, f"controller=static,tier=low,top_k=5,log_dir={tmp_path}")
    lmm.task_dict = {"t": {"test": {0: {"image": Image.new("RGB", (64, 48), "red")}}}}
    args = ("What colour is it?", " red", lambda doc: [doc["image"]], 0, "t", "test")
    request = Instance("loglikelihood", args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
    ((logprob, greedy),) = lmm.loglikelihood([request])
    assert logprob < 0 and isinstance(greedy, bool)
    (record,) = read_records(next(tmp_path.glob("*.jsonl")))
    assert (record.request_type, record.stop_reason, record.n_output_tokens) == ("loglikelihood", "score", 0)
    assert record.plan == Plan(3, 5, 8) and record.total_ms >= record.vision_ms + record.prefill_ms


def test_generate_until_returns_token_counts_and_logs_the_headline_numbers(lmm_class, tmp_path):
    """Each answer is a GenerationResult counting the prompt's tokens (image tokens included) and the generated
    ones, as its record does; the call's mean / p95 latency and violation rate go to lmms-eval's throughput."""
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history
    from PIL import Image

    lmm = make_lmm(lmm_class, f"controller=static,tier=low,budget=1,log_dir={tmp_path}")  # 1 ms: all violate
    lmm.task_dict = {
        "t": {"test": {i: {"image": Image.new("RGB", (64, 48), c)} for i, c in enumerate(("red", "green", "blue"))}}
    }
    requests = [
        Instance(
            "generate_until",
            ("Colour?", {"max_new_tokens": 2}, lambda doc: [doc["image"]], i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(3)
    ]
    answers = lmm.generate_until(requests)
    records = read_records(next(tmp_path.glob("*.jsonl")))
    assert all(isinstance(a, GenerationResult) for a in answers)
    for answer, record in zip(answers, records, strict=True):
        assert answer.text == record.answer
        assert (
            answer.token_counts.input_tokens == record.n_prompt_tokens == record.n_image_tokens + record.n_text_tokens
        )
        assert answer.token_counts.output_tokens == record.n_output_tokens
    logged = get_logged_metrics_history()[-1]
    assert logged["latency_mean_ms"] == pytest.approx(summarize(records)["latency_mean_ms"])
    assert logged["latency_p95_ms"] == pytest.approx(summarize(records)["latency_p95_ms"])
    assert logged["budget_violation_pct"] == 100.0 and "violation_rate" not in logged


def test_the_budget_guard_is_on_where_the_checkpoint_has_an_estimator(lmm_class, tiny_dir):
    assert make_lmm(lmm_class, "controller=static").guard is not None  # the built-in model ships one
    assert make_lmm(lmm_class, "controller=static,slowdown=false").guard is None
    assert make_lmm(lmm_class, f"pretrained={tiny_dir}").guard is None  # auto: none for this checkpoint
    with pytest.raises(ValueError, match="slowdown=true needs a latency estimator for this model"):
        make_lmm(lmm_class, f"pretrained={tiny_dir},slowdown=true")
