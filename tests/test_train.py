"""`python -m lmms_adaptive.tools.train`: settings, the MolmoE environment, a short run on the tiny default,
interruption and resume, and the trained artifact through the plugin and `report compare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lmms_adaptive.controllers.base import ArtifactError, read_artifact
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe
from lmms_adaptive.integration.tasks import load_samples
from lmms_adaptive.serving.request import task_style
from lmms_adaptive.tools.grpo import GRPORun
from lmms_adaptive.tools.train import MolmoeEnvironment, TrainConfig, load_settings, main, parser, train

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "tasks")
SHORT = {
    "tasks": ("synth_vqa_val", "synth_pope_val"), "include_path": (TASKS,), "limit": 3,
    "eval_tasks": ("synth_pope_test",), "eval_limit": 2, "eval_budgets_ms": (150.0,), "steps": 3, "group_size": 2,
    "requests_per_step": 2, "save_every": 1, "max_new_tokens": 8,
}  # fmt: skip


def test_settings_defaults_yaml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "grpo.yaml"
    path.write_text("steps: 7\ntasks: [synth_vqa_val]\nbudget_range_ms: [50, 250]\nlimit: null\nlr: 0.01\n")
    cfg = load_settings(path, {"steps": "9", "eval_budgets_ms": "100,200"})
    assert (cfg.steps, cfg.tasks, cfg.budget_range_ms, cfg.limit, cfg.lr) == (
        9,
        ("synth_vqa_val",),
        (50.0, 250.0),
        None,
        0.01,
    )
    assert cfg.eval_budgets() == [100.0, 200.0]
    assert TrainConfig(budget_range_ms=(100.0, 400.0)).eval_budgets() == [100.0, 141.4, 200.0, 282.8, 400.0]
    assert cfg.grpo().budget_range_ms == (50.0, 250.0) and cfg.grpo().lr == 0.01


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        ("stepz: 3\n", {}, r"unknown settings \['stepz'\]"),
        ("", {"steps": "many"}, "setting steps='many'"),
        ("", {"budget_range_ms": "300,100"}, "0 < LOW < HIGH"),
        ("", {"group_size": "1"}, "group_size must be >= 2"),
        ("", {"lr": "nan"}, "lr must be finite, got nan"),
        ("", {"eval_budgets_ms": "100,inf"}, r"eval_budgets_ms must be finite, got \(100.0, inf\)"),
        ("- a\n- b\n", {}, "expected a mapping"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path: Path, yaml_text: str, overrides: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        load_settings(path, overrides)


def test_cli_help_lists_every_setting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("--budget-range-ms", "--group-size", "--eval-tasks", "--config", "--kl-coef"):
        assert name in text
    with pytest.raises(SystemExit, match="setting steps"):
        main(["out", "--steps", "x"])


def test_environment_hidden_state_and_scored_runs(rt: AdaptiveMolmoe, lmms_env) -> None:
    samples = load_samples(["synth_pope_val"], [TASKS], 2, 0)
    env = MolmoeEnvironment(rt, samples, max_new_tokens=8)
    request = env.sample_request(torch.Generator().manual_seed(0), 120.0)
    assert request.budget_ms == 120.0 and request.question.shape == (rt.model.config.d_model,)
    token = torch.randn(rt.model.config.d_model)
    processed = rt.processor(
        request.sample.context, request.sample.images, max_crops=6, style=task_style(request.sample.task, "auto")
    )
    torch.testing.assert_close(request.stage2_hidden(6, 2, token), rt.latency_hidden(processed, 2, token))
    score, latency = env.run(request, Plan(max_crops=3, top_k=4, n_blocks=6, insert_pos=1))
    assert score in (0.0, 1.0) and latency > 0


def test_short_run_writes_artifact_logs_and_eval(tmp_path: Path, lmms_env, rt: AdaptiveMolmoe) -> None:
    out = tmp_path / "run"
    artifact_path = train(out, TrainConfig(**SHORT), device="cpu")
    artifact = read_artifact(artifact_path, rt.model_id, rt.knobs)  # made for the default model
    assert artifact["kind"] == "grpo" and artifact["training"]["plans_run"] == 3 * 2 * 2
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(0 <= float(r["violation_rate"]) <= 1 and float(r["latency_mean_ms"]) > 0 for r in rows)
    (result,) = json.loads((out / "eval.json").read_text())
    assert result["task"] == "synth_pope_test" and result["n"] == 2 and sum(result["plans"].values()) == 2
    assert (out / "curves.png").is_file() and (out / "eval.csv").is_file()
    with pytest.raises(ArtifactError, match="made for model"):
        read_artifact(artifact_path, "another-model", rt.knobs)


@pytest.mark.parametrize("save_every", [1, 5], ids=["saved before the interrupt", "interrupted before any save"])
def test_interrupted_run_resumes_without_lost_or_repeated_steps(
    tmp_path: Path, lmms_env, monkeypatch: pytest.MonkeyPatch, save_every: int
) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(**{**SHORT, "eval_tasks": (), "save_every": save_every})
    advance = GRPORun.advance

    def interrupted(self: GRPORun):
        if self.step == 2:
            raise KeyboardInterrupt
        return advance(self)

    monkeypatch.setattr(GRPORun, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(out, cfg, device="cpu")
    if save_every == 1:
        assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    else:  # two steps logged, none saved: the resumed run starts over and logs each step once
        assert not (out / "state.pt").exists() and len(list(csv.DictReader((out / "metrics.csv").open()))) == 2
    assert not (out / "controller.json").exists()
    monkeypatch.setattr(GRPORun, "advance", advance)
    train(out, cfg, device="cpu")
    with (out / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3
    with pytest.raises(ValueError, match="other settings"):
        train(out, TrainConfig(**{**SHORT, "eval_tasks": (), "save_every": save_every, "lr": 0.5}), device="cpu")


@pytest.mark.slow
def test_trained_artifact_through_the_plugin_and_report_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short run's artifact under lmms-eval (controller=<artifact>), compared with static and lookup."""
    from lmms_adaptive.serving.records import read_records
    from lmms_adaptive.tools.report import main as report_main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    artifact = train(tmp_path / "run", TrainConfig(**{**SHORT, "steps": 2, "eval_tasks": ()}), device="cpu")
    out = tmp_path / "cmp"
    argv = ["compare", "--controllers", f"static,lookup,grpo={artifact}", "--budgets", "150", "--tasks", "synth_pope_test",
            "--include-path", TASKS, "--limit", "2", "--out", str(out)]  # fmt: skip
    assert report_main(argv) == 0
    with (out / "report_synth_pope_test.csv").open() as f:
        rows = {r["controller"].split("[")[0]: r for r in csv.DictReader(f)}
    assert set(rows) == {"static", "lookup", "grpo"}
    assert all(r["n_requests"] == "2" and r["metric"] == "pope_accuracy" for r in rows.values())
    (records_file,) = (out / "runs" / "grpo@150" / "adaptive_molmoe").glob("*.jsonl")
    records = read_records(records_file)
    assert len(records) == 2 and all(r.controller["kind"] == "grpo" and r.budget_ms == 150.0 for r in records)
    assert all(r.controller_ms > 0 and r.violated == (r.total_ms > 150.0) for r in records)
    mean_blocks = sum(r.plan.n_blocks for r in records) / 2
    assert float(rows["grpo"]["mean_blocks"]) == pytest.approx(mean_blocks)
