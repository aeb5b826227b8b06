"""Several processes under `accelerate launch` on the CPU (2 ranks over gloo) against one process on the same
inputs: evaluation (records per rank, one summary, no padding request counted), profiling (one rows file,
no duplicate, no gap, resumable) and GRPO training (the same weights, one artifact)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmms_adaptive.core.plan import Plan
from lmms_adaptive.serving.ranks import Ranks
from lmms_adaptive.serving.records import RecordWriter, read_records
from lmms_adaptive.tools import profile

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
SCRIPTS = Path(__file__).resolve().parent


def launch(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` on the CPU: `--multi_gpu` starts the processes (torchrun), ACCELERATE_USE_CPU=true
    puts them on the CPU with gloo (accelerate's `--cpu` alone would start one process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
        "--dynamo_backend", "no", *args,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_single(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# -- the helpers, one process -------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_hold_every_item_once(world: int) -> None:
    items = list(range(11))
    shards = [Ranks(rank, world).shard(items) for rank in range(world)]
    assert sorted(x for shard in shards for x in shard) == items


def test_one_process_collectives_are_identities() -> None:
    ranks = Ranks()
    assert ranks.main and ranks.gather({"a": 1}) == [{"a": 1}]
    t = torch.tensor([1.0, 2.0])
    assert ranks.sum(t) is t and t.tolist() == [1.0, 2.0]
    ranks.barrier()


# -- evaluation ---------------------------------------------------------------------------------------

EVAL_ARGS = [
    "-m", "lmms_eval", "--model", "adaptive_molmoe",
    "--model_args", "controller=static,tier=low,top_k=6,blocks=7,warmup=false",
    "--include_path", str(TASKS), "--tasks", "synth_vqa_test", "--limit", "3", "--gen_kwargs", "max_new_tokens=4",
]  # fmt: skip


@pytest.mark.slow
def test_eval_two_ranks_one_summary_no_padding_counted(lmms_env: Path, tmp_path: Path) -> None:
    """3 docs over 2 ranks: rank 1 serves doc 1 and lmms-eval's padding clone of it; the clone is not recorded."""
    launch([*EVAL_ARGS, "--output_path", str(tmp_path / "two")], lmms_env)
    run_single([*EVAL_ARGS, "--output_path", str(tmp_path / "one")], lmms_env)

    files = sorted((tmp_path / "two" / "adaptive_molmoe").glob("*.jsonl"), key=lambda f: f.name.split("_rank")[1])
    assert [f.name.split("_rank")[1][0] for f in files] == ["0", "1"]  # each rank's own records
    by_rank = [read_records(f) for f in files]
    assert sorted(r.doc_id for r in by_rank[0]) == [0, 2] and [r.doc_id for r in by_rank[1]] == [1]
    (summary_file,) = (tmp_path / "two" / "adaptive_molmoe").glob("*.summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["overall"]["n_requests"] == 3
    assert summary["record_files"] == [f.name for f in files]

    (one_file,) = (tmp_path / "one" / "adaptive_molmoe").glob("*.jsonl")
    one = {r.doc_id: r for r in read_records(one_file)}
    two = {r.doc_id: r for records in by_rank for r in records}
    assert sorted(two) == sorted(one) == [0, 1, 2]
    for doc_id, r in one.items():
        assert (two[doc_id].answer, two[doc_id].plan, two[doc_id].n_output_tokens) == (
            r.answer,
            r.plan,
            r.n_output_tokens,
        )


# -- profiling ----------------------------------------------------------------------------------------

PROFILE_ARGS = [
    "--tasks", "synth_vqa_test", "--include-path", str(TASKS), "--limit", "2", "--device", "cpu",
    "--max-new-tokens", "4", "--grid", "max_crops=3;top_k=4,8;n_blocks=6,8;insert_pos=1",
]  # fmt: skip


@pytest.mark.slow
def test_profile_two_ranks_matches_one_and_resumes(lmms_env: Path, tmp_path: Path) -> None:
    """The 2-rank sweep skips a row an interrupted rank left in its journal, and its rows file has the 1-process
    sweep's (sample, plan) keys, once each, with the same answers and scores."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_single(["-m", "lmms_adaptive.tools.profile", str(one), *PROFILE_ARGS], lmms_env)
    single = {profile.row_key(r): r for r in profile.read_profile(one)}
    assert len(single) == 2 * 4

    two.mkdir()
    (two / profile.META_FILE).write_text((one / profile.META_FILE).read_text())
    planted = replace(next(iter(single.values())), total_ms=12345.0)  # measured before the interrupt
    writer = RecordWriter(two / "journal.rank1.jsonl")
    writer.write(planted)
    writer.close()
    launch(["-m", "lmms_adaptive.tools.profile", str(two), *PROFILE_ARGS], lmms_env)

    assert not (two / "journal.rank1.jsonl").exists()  # merged into the rows file
    assert all(not p.read_text() for p in two.glob("journal*.jsonl"))
    rows = profile._read_parquet(two / profile.ROWS_FILE)
    keys = [profile.row_key(r) for r in rows]
    assert sorted(keys) == sorted(single)  # no gap, no duplicate
    merged = {profile.row_key(r): r for r in rows}
    assert merged[profile.row_key(planted)].total_ms == 12345.0  # not measured again
    for key, r in single.items():
        assert (merged[key].answer, merged[key].score) == (r.answer, r.score)


def test_one_process_sweep_merges_rank_journals(rt, lmms_env: Path, tmp_path: Path) -> None:
    """A folder a 2-rank run left journals in resumes under one process: their rows are kept, not re-measured."""
    from lmms_adaptive.integration.tasks import load_samples

    samples = load_samples(["synth_vqa_test"], [str(TASKS)], limit=1, seed=0)
    plans = [Plan(3, 4, 6), Plan(3, 8, 8)]
    store = profile.ProfileStore(tmp_path, rt.model_id, rt.knobs, "journal.rank1.jsonl")
    store.append(replace(profile.measure(rt, samples[0], plans[0], 4, "auto"), total_ms=12345.0))
    store.close()
    path = profile.sweep(rt, samples, plans, tmp_path, max_new_tokens=4)
    rows = {r.plan: r for r in profile._read_parquet(path)}
    assert sorted(rows, key=str) == sorted(plans, key=str) and rows[plans[0]].total_ms == 12345.0
    assert not (tmp_path / "journal.rank1.jsonl").exists()


# -- GRPO training ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_two_ranks_same_weights_as_one(tmp_path: Path) -> None:
    """Deterministic scores and latencies: 2 ranks, each running half of every step's rollouts, end with the
    weights one process reaches on the same requests and plans."""
    from grpo_ranks import CONFIG, STEPS, trained
    from test_grpo import make_policy

    launch([str(SCRIPTS / "grpo_ranks.py"), str(tmp_path)], tmp_path)
    single, runs = trained()
    assert runs == STEPS * CONFIG.requests_per_step * CONFIG.group_size
    assert [json.loads((tmp_path / f"runs.rank{r}.json").read_text()) for r in (0, 1)] == [runs // 2, runs // 2]
    two = torch.load(tmp_path / "policy.pt", weights_only=True)
    initial = make_policy(seed=0).state_dict()
    assert any((initial[name] - value).abs().max() > 1e-3 for name, value in two.items())  # it did train
    for name, value in single.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_train_cli_two_ranks_one_artifact_and_resumes(lmms_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "-m", "lmms_adaptive.train", str(out), "--tasks", "synth_vqa_val", "--limit", "2", "--steps", "2",
        "--group-size", "2", "--requests-per-step", "2", "--save-every", "1", "--eval-tasks", "synth_vqa_test",
        "--eval-limit", "3", "--eval-budgets-ms", "200", "--max-new-tokens", "4", "--device", "cpu",
    ]  # fmt: skip
    proc = launch(args, lmms_env)
    assert proc.stdout.count("controller.json") == 1  # printed by rank 0 only
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "controller.json", "curves.png", "eval.csv", "eval.json", "metrics.csv", "settings.json", "state.pt",
    ]  # fmt: skip
    assert [row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()[1:]] == ["0", "1"]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert json.loads((out / "eval.json").read_text())[0]["n"] == 3  # the eval samples of both ranks

    run_single(args, lmms_env)  # resumed under one process: nothing left to train, the log is kept
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
