"""A regular (non-editable) install works on its own: the wheel carries the built-in model and the shipped
controller artifacts, and the README's command with `controller=grpo,budget=200` runs from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_adaptive.serving.records import read_records
from lmms_adaptive.tools.results import latest_results, task_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_mission_command_runs_from_the_wheel(tmp_path: Path) -> None:
    def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    source = tmp_path / "source"  # a fresh copy: no build/ left by an earlier build can fill the wheel
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".*", "build", "runs", "logs", "*.egg-info", "__pycache__")
    )
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(source),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    )
    (wheel,) = tmp_path.glob("lmms_adaptive-*.whl")
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel))

    elsewhere = tmp_path / "elsewhere"  # no checkout around: nothing of the repository is found by path
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}  # fmt: skip
    where = run(sys.executable, "-c", "import lmms_adaptive; print(lmms_adaptive.__file__)", cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site))
    out = elsewhere / "out"
    evaluation = run(
        sys.executable, "-m", "lmms_eval", "--model", "adaptive_molmoe", "--model_args", "controller=grpo,budget=200",
        "--include_path", str(REPO / "tasks"), "--tasks", "synth_pope_test", "--limit", "3", "--output_path", str(out),
        cwd=elsewhere, env=env,
    )  # fmt: skip
    assert list(out.rglob("*_results.json")), evaluation.stderr[-3000:]  # lmms-eval exits 0 on errors
    _, results = latest_results(out)
    assert task_metrics(results, "synth_pope_test")
    (records_file,) = (out / "adaptive_molmoe").glob("*.jsonl")
    records = read_records(records_file)
    assert len(records) == 3 and all(r.controller["kind"] == "grpo" and r.budget_ms == 200 for r in records)
