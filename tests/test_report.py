"""Reports: loading run folders, table numbers against the records, files, discovery, primary metric, compare."""

from __future__ import annotations

import csv
import json
import re
import types
from pathlib import Path

import fake_records
import pytest

from lmms_adaptive.core.plan import Plan
from lmms_adaptive.serving.records import RecordWriter, RequestRecord
from lmms_adaptive.tools.report import (
    PlanPoint,
    RunResult,
    TaskRun,
    compare,
    default_budgets,
    discover_runs,
    frontier,
    frontier_score,
    load_run,
    main,
    parse_controllers,
    plan_points,
    primary_metric,
    task_tables,
    tier_shares,
    tier_table,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
FULL = {"max_crops": 12, "top_k": 8, "n_blocks": 8, "insert_pos": 1, "renormalize": False}
LOW = {"max_crops": 3, "top_k": 4, "n_blocks": 6, "insert_pos": 1, "renormalize": False}
MID = {"max_crops": 6, "top_k": 6, "n_blocks": 7, "insert_pos": 2, "renormalize": False}
TASKS = ("synth_pope_test", "synth_vqa_test")

# Latencies (ms) per (controller, budget, task): 4 requests each; the lookup controller picks plans per request.
LATENCIES = {
    ("static", 50.0, "synth_pope_test"): [10.0, 20.0, 30.0, 40.0],
    ("static", 50.0, "synth_vqa_test"): [45.0, 55.0, 65.0, 75.0],
    ("static", 200.0, "synth_pope_test"): [11.0, 21.0, 31.0, 41.0],
    ("static", 200.0, "synth_vqa_test"): [46.0, 56.0, 66.0, 300.0],
    ("lookup", 50.0, "synth_pope_test"): [5.0, 6.0, 7.0, 80.0],
    ("lookup", 50.0, "synth_vqa_test"): [8.0, 9.0, 60.0, 70.0],
    ("lookup", 200.0, "synth_pope_test"): [12.0, 22.0, 32.0, 42.0],
    ("lookup", 200.0, "synth_vqa_test"): [100.0, 150.0, 250.0, 210.0],
}
LOOKUP_PLANS = [LOW, MID, FULL, FULL]
SCORES = {"synth_pope_test": 0.75, "synth_vqa_test": 0.5}


def make_record(
    task: str, doc_id: int, controller: dict, budget: float | None, plan: dict, total_ms: float
) -> RequestRecord:
    return fake_records.make_record(
        task=task, doc_id=doc_id, controller=controller, budget_ms=budget, plan=Plan(**plan), n_crops=plan["max_crops"],
        n_output_tokens=2, controller_ms=0.1, decode_ms=[1.0], total_ms=total_ms,
        violated=None if budget is None else total_ms > budget, score=None,
    )  # fmt: skip


def results_json(scores: dict[str, float]) -> dict:
    """lmms-eval's results layout: `metric,filter` keys in metric_list order, stderr entries, alias."""
    out = {}
    for task, score in scores.items():
        if task.startswith("synth_pope"):
            out[task] = {"alias": task, "pope_accuracy,none": score, "pope_accuracy_stderr,none": "N/A",
                         "pope_precision,none": 0.9, "pope_precision_stderr,none": "N/A"}  # fmt: skip
        else:
            out[task] = {"alias": task, "exact_match,none": score, "exact_match_stderr,none": 0.1,
                         "submission,none": None, "submission_stderr,none": "N/A"}  # fmt: skip
    return {"results": out, "config": {"model": "adaptive_molmoe"}}


def make_run(folder: Path, kind: str, budget: float, model_subdir: str = "") -> Path:
    controller = {"kind": "static", "plan": FULL} if kind == "static" else {"kind": kind}
    writer = RecordWriter(folder / "adaptive_molmoe" / "adaptive_molmoe_20250101_000000_rank0.jsonl")
    for task in TASKS:
        for i, ms in enumerate(LATENCIES[kind, budget, task]):
            plan = FULL if kind == "static" else LOOKUP_PLANS[i]
            writer.write(make_record(task, i, controller, budget, plan, ms))
    writer.close()
    results_dir = folder / model_subdir
    results_dir.mkdir(parents=True, exist_ok=True)
    scores = {t: s + (0.1 if kind == "lookup" else 0.0) + budget / 1000 for t, s in SCORES.items()}
    (results_dir / "2025-01-01T00-00-00.000000_results.json").write_text(json.dumps(results_json(scores)))
    return folder


@pytest.fixture
def runs_parent(tmp_path: Path) -> Path:
    parent = tmp_path / "runs"
    for kind in ("static", "lookup"):
        for budget in (50.0, 200.0):
            # one layout without pretrained (results directly in the folder), one with lmms-eval's model subfolder
            make_run(parent / f"{kind}@{budget:g}", kind, budget, model_subdir="ckpt__tiny" if kind == "lookup" else "")
    return parent


def hand_p95(values: list[float]) -> float:
    """Linear interpolation between order statistics at rank 0.95 * (n - 1)."""
    s = sorted(values)
    pos = 0.95 * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


# ----------------------------------------------------------------------------------------------------


def test_primary_metric_rules():
    pope = {"alias": "pope", "pope_accuracy,none": 0.8, "pope_accuracy_stderr,none": "N/A", "pope_f1_score,none": 0.7}
    assert primary_metric(pope) == ("pope_accuracy", 0.8)
    textvqa = {
        "alias": "t",
        "submission,none": None,
        "submission_stderr,none": "N/A",
        "exact_match_stderr,none": 0.1,
        "exact_match,none": 0.4,
    }
    assert primary_metric(textvqa) == ("exact_match", 0.4)
    assert primary_metric({"submission,none": 3, "acc,strict": 0.5}) == ("acc,strict", 0.5)
    mme = {"alias": "mme", "mme_perception_score,none": 900.0, "mme_cognition_score,none": 250.0}
    assert primary_metric(mme) == ("mme_total_score", 1150.0)
    assert primary_metric({"mme_perception_score,none": 900.0}) == ("mme_perception_score", 900.0)
    assert primary_metric({"alias": "x", "flag,none": True, "acc,none": "N/A"}) is None
    assert primary_metric({}) is None


def test_discover_runs_under_parent(runs_parent: Path, tmp_path: Path):
    found = discover_runs([tmp_path])
    assert sorted(p.name for p in found) == ["lookup@200", "lookup@50", "static@200", "static@50"]
    assert discover_runs([runs_parent / "static@50"]) == [runs_parent / "static@50"]
    with pytest.raises(FileNotFoundError):
        discover_runs([tmp_path / "missing"])


def test_load_run_labels_budget_and_metric(runs_parent: Path):
    static = load_run(runs_parent / "static@50")
    assert static.controller == "static[crops12_k8_b8_p1]"
    assert static.budget_ms == 50.0
    assert set(static.tasks) == set(TASKS)
    assert static.tasks["synth_pope_test"].metric == "pope_accuracy"
    assert static.tasks["synth_pope_test"].score == pytest.approx(0.75 + 0.05)
    assert static.tasks["synth_vqa_test"].metric == "exact_match"
    assert len(static.tasks["synth_vqa_test"].records) == 4
    lookup = load_run(runs_parent / "lookup@200")  # results in the model subfolder
    assert lookup.controller == "lookup"
    assert lookup.tasks["synth_vqa_test"].score == pytest.approx(0.5 + 0.1 + 0.2)


def test_load_run_rejects_mixed_or_missing_records(tmp_path: Path):
    folder = make_run(tmp_path / "mixed", "static", 50.0)
    writer = RecordWriter(folder / "adaptive_molmoe" / "adaptive_molmoe_20250101_000001_rank0.jsonl")
    writer.write(make_record("synth_pope_test", 9, {"kind": "static", "plan": FULL}, 999.0, FULL, 1.0))
    writer.close()
    with pytest.raises(ValueError, match="budget_ms"):
        load_run(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x_results.json").write_text(json.dumps(results_json(SCORES)))
    with pytest.raises(ValueError, match="no request records"):
        load_run(empty)


def test_table_numbers_equal_hand_computations(runs_parent: Path):
    runs = [load_run(p) for p in discover_runs([runs_parent])]
    tables = task_tables(runs)
    assert list(tables) == list(TASKS)
    for task, rows in tables.items():
        assert [(r.controller, r.budget_ms) for r in rows] == [
            ("lookup", 50.0), ("lookup", 200.0), ("static[crops12_k8_b8_p1]", 50.0), ("static[crops12_k8_b8_p1]", 200.0)
        ]  # fmt: skip
        for row in rows:
            kind = "static" if row.controller.startswith("static") else "lookup"
            ms = LATENCIES[kind, row.budget_ms, task]
            plans = [FULL] * 4 if kind == "static" else LOOKUP_PLANS
            assert row.n_requests == 4
            assert row.latency_mean_ms == pytest.approx(sum(ms) / 4)
            assert row.latency_p95_ms == pytest.approx(hand_p95(ms))
            assert row.violation_rate == pytest.approx(sum(m > row.budget_ms for m in ms) / 4)
            assert row.mean_max_crops == pytest.approx(sum(p["max_crops"] for p in plans) / 4)
            assert row.mean_top_k == pytest.approx(sum(p["top_k"] for p in plans) / 4)
            assert row.mean_blocks == pytest.approx(sum(p["n_blocks"] for p in plans) / 4)
            bonus = 0.1 if kind == "lookup" else 0.0
            assert row.score == pytest.approx(SCORES[task] + bonus + row.budget_ms / 1000)  # from the results file
    pope_static_50 = tables["synth_pope_test"][2]
    assert pope_static_50.latency_p95_ms == pytest.approx(38.5)  # 30 + 0.85 * 10
    assert pope_static_50.violation_rate == 0.0
    assert tables["synth_vqa_test"][2].violation_rate == pytest.approx(0.75)  # 55, 65, 75 > 50


def test_write_report_files(runs_parent: Path, tmp_path: Path):
    out = tmp_path / "report"
    runs = [load_run(p) for p in discover_runs([runs_parent])]
    path = write_report(runs, out)
    assert path == out / "report.md"
    combined = path.read_text()
    for task in TASKS:
        assert f"## {task}" in combined and f"report_{task}.png" in combined
        assert (out / f"report_{task}.png").stat().st_size > 0
        md = (out / f"report_{task}.md").read_text()
        assert md.count("\n| ") == 5  # header + 4 rows (the separator starts with "|-")
    assert "| static[crops12_k8_b8_p1] | 50 | 0.55 | 60.0 | 73.5 | 75.0 | — | 12.00 | 8.00 | 8.00 | 4 |" in combined
    with (out / "report_synth_pope_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    lookup_50 = rows[0]
    assert (lookup_50["controller"], float(lookup_50["budget_ms"]), lookup_50["metric"]) == (
        "lookup",
        50.0,
        "pope_accuracy",
    )
    assert float(lookup_50["latency_mean_ms"]) == pytest.approx(24.5)
    assert float(lookup_50["violation_rate_pct"]) == pytest.approx(25.0)
    assert float(lookup_50["mean_max_crops"]) == pytest.approx((3 + 6 + 12 + 12) / 4)


def test_tiers_chosen_per_question_type():
    plans_types = [(LOW, "color"), (LOW, "color"), (MID, "color"), (FULL, "read"), (FULL, "read"), (LOW, None)]
    records = [
        fake_records.make_record(doc_id=i, plan=Plan(**plan), question_type=qtype)
        for i, (plan, qtype) in enumerate(plans_types)
    ]
    assert tier_shares(records) == {
        "color": {3: pytest.approx(2 / 3), 6: pytest.approx(1 / 3), 12: 0.0},
        "read": {3: 0.0, 6: 0.0, 12: 1.0},
    }
    run = RunResult(
        Path("r"), "grpo", 100.0, {"synth_vqa_test": TaskRun("synth_vqa_test", "exact_match", 0.5, records)}
    )
    assert tier_table([run], "synth_vqa_test").splitlines() == [
        "| controller | budget (ms) | color (3/6/12 crops, %) | read (3/6/12 crops, %) |",
        "|---|---|---|---|",
        "| grpo | 100 | 67/33/0 | 0/0/100 |",
    ]
    untyped = RunResult(Path("r"), "grpo", 100.0, {"t": TaskRun("t", None, None, records[-1:])})
    assert tier_table([untyped], "t") == ""


def profile_row(task: str, doc_id: int, plan: dict, score: float, total_ms: float) -> RequestRecord:
    return fake_records.make_record(task=task, doc_id=doc_id, plan=Plan(**plan), score=score, total_ms=total_ms)


PROFILE = [
    profile_row(task, doc, plan, score, ms)
    for task in TASKS
    for doc in range(2)
    for plan, score, ms in ((LOW, 0.5 * doc, 10.0 + doc), (FULL, 1.0, 50.0 + 10 * doc))
]


def test_plan_points_and_default_budgets():
    points = plan_points(PROFILE, "synth_pope_test")
    assert [(p.plan, p.score, p.latency_mean_ms, p.n_samples) for p in points] == [
        ("crops12_k8_b8_p1", 1.0, 55.0, 2), ("crops3_k4_b6_p1", 0.25, 10.5, 2)
    ]  # fmt: skip
    budgets = default_budgets(PROFILE)
    assert len(budgets) == 5 and budgets == sorted(budgets)
    assert 10.0 <= budgets[0] < budgets[-1] <= 60.0


def test_frontier_is_the_upper_hull_that_mixing_plans_reaches():
    def point(name: str, ms: float, score: float) -> PlanPoint:
        return PlanPoint(name, score, ms, 10)

    a, b, c, d = point("a", 50, 0.5), point("b", 100, 0.8), point("c", 200, 0.9), point("d", 400, 0.95)
    under = [point("u", 150, 0.8), point("slow", 500, 0.9), point("mixed", 150, 0.6), point("a2", 50, 0.4)]
    assert frontier([*under, d, c, b, a]) == [a, b, c, d]
    # at 0.6, b is under the segment a-c (0.633 at 100 ms): mixing a and c beats it
    assert frontier([a, point("b", 100, 0.6), c]) == [a, c]
    hull = frontier([a, b, c, d])
    assert frontier_score(hull, 75) == pytest.approx(0.65)
    assert frontier_score(hull, 300) == pytest.approx(0.925)
    assert (frontier_score(hull, 10), frontier_score(hull, 900)) == (0.5, 0.95)


def test_report_cli_with_profile_and_oracle(runs_parent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Profile plan points on the plot and oracle rows at the runs' budgets (50 and 200 ms)."""
    profile = [*PROFILE, profile_row("other_task", 0, FULL, 1.0, 5.0)]  # profiled, never evaluated: no table
    monkeypatch.setattr("lmms_adaptive.tools.report._read_profile", lambda folder: profile if folder else [])
    out = tmp_path / "out"
    assert main([str(runs_parent), "--out", str(out), "--profile", str(tmp_path / "profile")]) == 0
    assert sorted(p.name for p in out.glob("*.md")) == [
        "report.md",
        "report_synth_pope_test.md",
        "report_synth_vqa_test.md",
    ]
    with (out / "report_synth_vqa_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    oracle = [r for r in rows if r["controller"] == "oracle"]
    # no question types in this profile: one lookup table (p90) per task picks the low plan at 50 ms
    by_type = [
        (float(r["budget_ms"]), float(r["score"])) for r in rows if r["controller"] == "oracle per question type"
    ]
    assert by_type == [(50.0, 0.25), (200.0, 1.0)]
    # 50 ms: doc 0 keeps the full plan (score 1, 50 ms); doc 1's full plan (60 ms) is over budget, its
    # low plan (score 0.5, 11 ms) fits. 200 ms: both keep the full plan. Means over the 2 samples.
    got = [[float(r[k]) for k in ("budget_ms", "score", "latency_mean_ms", "latency_p95_ms", "violation_rate_pct",
                                  "mean_max_crops", "mean_top_k", "mean_blocks", "n_requests")] for r in oracle]  # fmt: skip
    assert got == [
        pytest.approx([50.0, 0.75, 30.5, 11 + 0.95 * 39, 0.0, 7.5, 6.0, 7.0, 2]),
        pytest.approx([200.0, 1.0, 55.0, 59.5, 0.0, 12.0, 8.0, 8.0, 2]),
    ]
    md = (out / "report_synth_vqa_test.md").read_text()
    # the frontier runs from LOW (0.25 at 10.5 ms) to FULL (1 at 55 ms): 0.25 + 0.75 * (30.5 - 10.5) / 44.5
    assert float(oracle[0]["above_frontier"]) == pytest.approx(0.75 - (0.25 + 0.75 * 20 / 44.5))
    assert "| oracle (profile) | 200 | 1 | 55.0 | 59.5 | 0.0 | +0.000 | 12.00 | 8.00 | 8.00 | 2 |\n" in md
    assert md.endswith(
        "| oracle per question type (profile) | 200 | 1 | 55.0 | 59.5 | 0.0 | +0.000 | 12.00 | 8.00 | 8.00 | 2 |\n"
    )
    # at 50 ms no plan stays within 2 % of violations (FULL's doc 1 takes 60 ms): LOW, which never runs over
    best = [(float(r["budget_ms"]), float(r["score"])) for r in rows if r["controller"] == "best fixed plan"]
    assert best == [(50.0, 0.25), (200.0, 1.0)]
    assert (out / "report_synth_vqa_test.png").stat().st_size > 0


def test_parse_controllers(tmp_path: Path):
    artifact = tmp_path / "lookup.json"
    artifact.write_text("{}")
    specs = parse_controllers(f"static, lookup={artifact}")
    assert [(s.name, s.named) for s in specs] == [("static", False), ("lookup", True)]
    assert specs[1].model_arg == str(artifact.resolve())
    assert [(s.name, s.model_arg, s.named) for s in parse_controllers("lookup,grpo")] == [
        ("lookup", "lookup", False), ("grpo", "grpo", False)]  # fmt: skip
    with pytest.raises(ValueError, match="NAME=ARTIFACT_FILE"):
        parse_controllers("mine")
    with pytest.raises(FileNotFoundError):
        parse_controllers(f"grpo={tmp_path / 'missing.json'}")


def test_compare_commands_resume_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """compare with lmms-eval stubbed: the command line, skipping finished runs, and the error when no results appear."""
    calls = []

    def fake_run(cmd, check, cwd, env, stdout, stderr):
        calls.append((cmd, Path(cwd), env))
        args = cmd[cmd.index("--model_args") + 1]
        if "budget=200" in args:
            make_run(Path(cwd), "static", 200.0)
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr("lmms_adaptive.tools.report.subprocess.run", fake_run)
    out = tmp_path / "cmp"
    argv = ["compare", "--controllers", "static", "--budgets", "200", "--tasks", "synth_pope_test,synth_vqa_test",
            "--include-path", "tasks", "--limit", "3", "--pretrained", str(tmp_path), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    ((cmd, cwd, env),) = calls
    assert cmd[1:5] == ["-m", "lmms_eval", "--model", "adaptive_molmoe"]
    assert cmd[cmd.index("--model_args") + 1] == f"controller=static,budget=200,pretrained={tmp_path.resolve()}"
    assert cmd[cmd.index("--include_path") + 1] == str(Path("tasks").resolve())
    assert cmd[cmd.index("--limit") + 1] == "3" and cmd[cmd.index("--tasks") + 1] == "synth_pope_test,synth_vqa_test"
    assert cwd == Path(cmd[cmd.index("--output_path") + 1]) == (out / "runs" / "static@200").resolve()
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert (out / "report_synth_vqa_test.csv").is_file()

    assert main(argv) == 0  # finished: not run again
    assert len(calls) == 1
    failing = [*argv[:4], "50,200", *argv[5:]]
    assert main(failing) == 1  # the 50 ms run writes no results
    assert len(calls) == 2
    log_file = out / "runs" / "static@50" / "lmms_eval.log"
    assert log_file.is_file()
    with pytest.raises(RuntimeError, match=re.escape(str(log_file.resolve()))):
        compare(parse_controllers("static"), [50.0], ["synth_pope_test"], out)


@pytest.mark.slow
def test_compare_static_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """lmms-eval on the default model at budgets 1 ms (every request over) and 100 s (none over)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out = tmp_path / "cmp"
    argv = ["compare", "--controllers", "static", "--budgets", "1,100000", "--tasks", "synth_pope_test",
            "--include-path", str(REPO / "tasks"), "--limit", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with (out / "report_synth_pope_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["budget_ms"]) for r in rows] == [1.0, 100000.0]
    assert all(
        r["controller"].startswith("static[") and r["metric"] == "pope_accuracy" and r["n_requests"] == "2"
        for r in rows
    )
    assert [float(r["violation_rate_pct"]) for r in rows] == [100.0, 0.0]
    assert (out / "report.md").is_file() and (out / "report_synth_pope_test.png").is_file()
    stamps = sorted(p.stat().st_mtime for p in (out / "runs").rglob("*_results.json"))
    assert main(argv) == 0  # resumable: both runs are skipped
    assert sorted(p.stat().st_mtime for p in (out / "runs").rglob("*_results.json")) == stamps
