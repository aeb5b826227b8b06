"""The run table `make demo` ends with: every number is read from the run's own records and samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_records import make_record

from lmms_adaptive.core.plan import Plan
from lmms_adaptive.serving.records import RecordWriter
from lmms_adaptive.tools.results import format_table, main, run_table

LOW, HIGH = Plan(3, 4, 6), Plan(12, 8, 8)


def write_run(folder: Path) -> list:
    """Four synth_vqa_test requests (two question types), two pope ones, a results file and samples files."""
    records = [
        make_record(task="synth_vqa_test", doc_id=0, question_type="color", plan=LOW, total_ms=50.0, budget_ms=100.0, violated=False),
        make_record(task="synth_vqa_test", doc_id=1, question_type="color", plan=LOW, total_ms=70.0, budget_ms=100.0, violated=False),
        make_record(task="synth_vqa_test", doc_id=2, question_type="read", plan=HIGH, total_ms=150.0, budget_ms=100.0, violated=True),
        make_record(task="synth_vqa_test", doc_id=3, question_type="read", plan=LOW, total_ms=90.0, budget_ms=100.0, violated=False),
        make_record(task="pope_local", doc_id=0, plan=LOW, total_ms=40.0, budget_ms=100.0, violated=False),
        make_record(task="pope_local", doc_id=1, plan=LOW, total_ms=60.0, budget_ms=100.0, violated=False),
    ]  # fmt: skip
    writer = RecordWriter(folder / "adaptive_molmoe" / "adaptive_molmoe_20260101_000000_rank0_pid1.jsonl")
    for record in records:
        writer.write(record)
    writer.close()
    results = {"results": {
        "synth_vqa_test": {"alias": "synth_vqa_test", "exact_match,none": 0.75, "exact_match_stderr,none": 0.1},
        "pope_local": {"alias": "pope_local", "pope_accuracy,none": 0.5, "pope_accuracy_stderr,none": "N/A"},
    }}  # fmt: skip
    (folder / "20260101_results.json").write_text(json.dumps(results))
    vqa = [{"doc_id": i, "exact_match": s, "submission": {"answer": "x"}} for i, s in enumerate([1, 1, 0.0, 1])]
    pope = [{"doc_id": i, "pope_accuracy": {"score": s, "prediction": "yes"}} for i, s in enumerate([1.0, 0.0])]
    for task, rows in (("synth_vqa_test", vqa), ("pope_local", pope)):
        (folder / f"20260101_samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return records


def test_the_table_is_the_records_numbers(tmp_path: Path) -> None:
    records = write_run(tmp_path)
    results = json.loads((tmp_path / "20260101_results.json").read_text())
    lines = {ln.label.strip(): ln for ln in run_table(tmp_path, ["synth_vqa_test", "pope_local"], results)}
    assert list(lines) == ["synth_vqa_test", "color", "read", "pope_local"]  # pope_local has no question types
    vqa, color, read = lines["synth_vqa_test"], lines["color"], lines["read"]
    assert (vqa.n, vqa.score, vqa.violation_rate) == (4, 0.75, 0.25)  # the score is the results file's
    assert vqa.latency_mean_ms == pytest.approx(np.mean([r.total_ms for r in records[:4]]))
    assert vqa.latency_p95_ms == pytest.approx(np.percentile([50, 70, 150, 90], 95))
    assert vqa.plans == f"{LOW.key} 75%, {HIGH.key} 25%"
    assert (color.n, color.score, color.latency_mean_ms, color.violation_rate) == (2, 1.0, 60.0, 0.0)
    assert (read.n, read.score, read.latency_mean_ms, read.violation_rate) == (2, 0.5, 120.0, 0.5)  # samples' scores
    table = format_table(list(lines.values()), ["pope_local"])
    assert "pope_local" in table and table.splitlines()[-1].endswith("(format check)")


def test_the_demo_check_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path)
    assert main([str(tmp_path), "--tasks", "synth_vqa_test,pope_local", "--format-checks", "pope_local"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task / question type") and "  read " in out and "records and summary:" in out
