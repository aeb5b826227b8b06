"""Train the two-stage controller with GRPO on lmms-eval tasks, then evaluate it on held-out tasks.

    python -m lmms_adaptive.train runs/grpo                          # tiny default model, synthetic training tasks
    python -m lmms_adaptive.train runs/grpo --config grpo.yaml       # settings from YAML; flags override it
    python -m lmms_adaptive.train runs/grpo --pretrained /ckpt/MolmoE-1B-0924 --tasks textvqa_val --limit 500 \\
        --budget-range-ms 150,400 --eval-tasks textvqa_val --device cuda

Each step draws `requests_per_step` training samples (seeded) with a budget each (log-uniform over
`budget_range_ms`), samples a group of `group_size` plans per request from the policy, runs every plan
at batch size 1 through the one request path (the task's prompt, generation kwargs and image; the
latency token inserted to block p), scores the answer with the task's own `process_results`, and
rewards score minus the latency's cost: a small one within budget, a penalty over it (`grpo.reward`,
with the latency measured end to end).
The LLM is frozen; the budget encoder and both heads train (`grpo.grpo_step`).

The run folder holds `settings.json` (a resumed run must use the same), `state.pt` (every
`save_every` steps: policy, optimizer, lr schedule, rng), `metrics.csv` and `curves.png` (reward,
score, latency, violations), `controller.json` (the artifact `controller=<path>` loads; copy it to
`controllers/` for `controller=grpo`) and `eval.csv` / `eval.json` (the greedy policy on the eval
tasks at each eval budget). Re-running the same command resumes where it stopped.

Under `accelerate launch --num_processes N` every rank loads the model on its own device; each step's
rollouts are split over the ranks and the policy's gradients summed over them (`grpo.grpo_step`), so all
ranks hold the same weights, and the evaluation's samples are split too. Rank 0 alone holds the folder lock
and writes every file (settings, state, metrics, artifact, eval); the other ranks only read `state.pt` to
resume. A run may resume under another number of processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmms_adaptive.controllers.base import Controller, Stage1
from lmms_adaptive.controllers.grpo import GRPOController, PolicyDims, PolicyRequest, TwoStagePolicy, request_features
from lmms_adaptive.core.plan import Plan, RequestFacts
from lmms_adaptive.core.runtime import AdaptiveMolmoe
from lmms_adaptive.integration.tasks import TaskSample, load_samples
from lmms_adaptive.serving.ranks import SINGLE, Ranks, init
from lmms_adaptive.serving.records import RequestRecord, summarize
from lmms_adaptive.serving.request import DEFAULT_MAX_NEW_TOKENS, Request, serve
from lmms_adaptive.tools.cli import HelpFormatter, progress, setup_logging, took
from lmms_adaptive.tools.grpo import GRPOConfig, GRPORun, Penalty, StepStats
from lmms_adaptive.tools.runlog import (
    TensorBoardCurves,
    check_settings,
    exclusive,
    plot_with_mean,
    read_rows,
    save_atomic,
    truncate_csv,
    write_rows,
)

log = logging.getLogger(__name__)

REPO_TASKS = Path(__file__).resolve().parents[2] / "tasks"  # the local tasks of a source checkout
ADVANTAGES = ("std", "centred")  # TrainConfig.advantages


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (a resumed run must match). Lists are comma-separated on the command line."""

    pretrained: str | None = None  # checkpoint folder; None: the built-in tiny model
    tasks: tuple[str, ...] = ("synth_vqa_train", "synth_pope_train")
    include_path: tuple[str, ...] = (str(REPO_TASKS),) if REPO_TASKS.is_dir() else ()
    limit: int | None = None  # training samples per task (seeded draw); None: all
    eval_tasks: tuple[str, ...] = ("synth_vqa_test", "synth_pope_test")
    eval_limit: int | None = 40
    eval_budgets_ms: tuple[float, ...] = ()  # empty: 5 budgets spread log-evenly over budget_range_ms
    steps: int = 250
    group_size: int = 8
    requests_per_step: int = 8
    budget_range_ms: tuple[float, ...] = (70.0, 300.0)  # the tiny default on a CPU: cheapest plan p50 to full p95
    lr: float = 1e-3
    stage1_lr_scale: float = 0.1
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.03
    epochs: int = 2
    advantages: str = "std"  # "std": group-normalised; "centred": r - mean only (see grpo.group_advantages)
    penalty: float = 1.0
    penalty_per_overshoot: float = 1.0
    penalty_cap: float = 1.0  # the relative overshoot counted at most
    latency_cost: float = 0.05  # reward lost to a full budget of latency within it (see grpo.Penalty)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when a task's gen_kwargs set none
    save_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.budget_range_ms) != 2 or not 0 < self.budget_range_ms[0] < self.budget_range_ms[1]:
            raise ValueError(
                f"budget_range_ms must be two numbers LOW,HIGH with 0 < LOW < HIGH, got {self.budget_range_ms}"
            )
        for name in ("steps", "group_size", "requests_per_step", "epochs", "save_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if not self.tasks:
            raise ValueError("tasks: name at least one lmms-eval task to train on")
        if self.advantages not in ADVANTAGES:
            raise ValueError(f"advantages must be one of {', '.join(ADVANTAGES)}, got {self.advantages!r}")
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.type in ("float", "tuple[float, ...]")}
        for name, value in numbers.items():
            if not all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"{name} must be finite, got {value}")

    def grpo(self) -> GRPOConfig:
        low, high = self.budget_range_ms
        return GRPOConfig(
            group_size=self.group_size, requests_per_step=self.requests_per_step, lr=self.lr,
            stage1_lr_scale=self.stage1_lr_scale, clip_eps=self.clip_eps, kl_coef=self.kl_coef,
            entropy_coef=self.entropy_coef, epochs=self.epochs, scale_advantages=self.advantages == "std", penalty=Penalty(self.penalty, self.penalty_per_overshoot, self.penalty_cap, self.latency_cost),
            budget_range_ms=(low, high), seed=self.seed,
        )  # fmt: skip

    def eval_budgets(self) -> list[float]:
        if self.eval_budgets_ms:
            return list(self.eval_budgets_ms)
        low, high = self.budget_range_ms
        return [round(math.exp(x), 1) for x in np.linspace(math.log(low), math.log(high), 5)]


# ----------------------------------------------------------------------------------------------------
# The environment: task samples on the loaded model
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TaskRequest(PolicyRequest):
    sample: TaskSample
    request: Request


class RolloutController(Controller):
    """One sampled plan, executed as the grpo controller executes its decisions: stage 1 gives the tier, the
    insertion position and a latency token (a probe: its values change neither the answer nor the latency),
    stage 2 at block p gives the rest. So a rollout costs what the plan costs under `controller=grpo`."""

    kind = "grpo-rollout"

    def __init__(self, plan: Plan, probe: Tensor) -> None:
        self.plan, self.probe = plan, probe

    def stage1(self, facts: RequestFacts) -> Stage1:
        return Stage1(self.plan.max_crops, self.plan.insert_pos, latency_token=self.probe)

    def stage2(self, facts: RequestFacts, first: Stage1, hidden: Tensor) -> Plan:
        return self.plan


class MolmoeEnvironment:
    """GRPO's `Environment` over lmms-eval task samples on a loaded model.

    A request is a sample under a budget: the policy's inputs come from the model's own tokenizer and
    embedding table and the request facts, and its stage-2 hidden state from the model run to block p
    with the latency token. A plan is served through the one request path (`serving.request.serve`) and
    scored by the task's own `process_results`; its latency is the record's end-to-end `total_ms`.
    """

    def __init__(self, rt: AdaptiveMolmoe, samples: Sequence[TaskSample], max_new_tokens: int, style: str = "auto"):
        if not samples:
            raise ValueError("the training environment needs at least one task sample")
        self.rt, self.samples, self.max_new_tokens, self.style = rt, list(samples), max_new_tokens, style
        self._probe_token = torch.zeros(rt.model.config.d_model)

    def sample_request(self, rng: torch.Generator, budget_ms: float) -> TaskRequest:
        sample = self.samples[int(torch.randint(len(self.samples), (), generator=rng))]
        request = sample.request(budget_ms, self.max_new_tokens, self.style)
        facts = self.rt.request_facts(
            request.question, request.images, budget_ms, request.gen.max_new_tokens, sample.task
        )
        return TaskRequest(
            budget_ms=budget_ms,
            question=self.rt.question_summary(facts.question_ids),
            features=request_features(facts, self.rt.knobs),
            stage2_hidden=partial(self._stage2_hidden, request),
            sample=sample,
            request=request,
        )

    def _stage2_hidden(self, request: Request, max_crops: int, insert_pos: int, token: Tensor) -> Tensor:
        processed = self.rt.processor(request.question, request.images, max_crops=max_crops, style=request.style)
        return self.rt.latency_hidden(processed, insert_pos, token.detach()).cpu()

    def run(self, request: TaskRequest, plan: Plan) -> tuple[float, float]:
        served = serve(self.rt, RolloutController(plan, self._probe_token), request.request)
        return request.sample.score(served.text), served.record.total_ms


# ----------------------------------------------------------------------------------------------------
# Evaluation of a controller on held-out samples
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """A controller on one task at one budget, measured through the one request path."""

    task: str
    budget_ms: float
    n: int
    score: float
    latency_mean_ms: float
    latency_p95_ms: float
    violation_rate: float
    controller_ms_mean: float
    plans: dict[str, int]  # plan key -> requests, most used first


def evaluate(
    rt: AdaptiveMolmoe,
    controller: Controller,
    samples: Sequence[TaskSample],
    budgets: Sequence[float],
    max_new_tokens: int,
    ranks: Ranks = SINGLE,
) -> list[EvalResult]:
    """Every sample at every budget, served under `controller` as the plugin serves it; per (task, budget) means.
    With several ranks each serves its share of the samples and every rank gets all the results."""
    results = []
    for budget in budgets:
        mine = []
        shard = ranks.shard(list(enumerate(samples)))
        for i, sample in progress(
            shard, desc=f"eval @ {budget:g} ms", unit="request", leave=False, disable=not ranks.main
        ):
            served = serve(rt, controller, sample.request(budget, max_new_tokens))
            mine.append((i, sample.task, replace(served.record, score=sample.score(served.text))))
        scored: dict[str, list[RequestRecord]] = {}
        for _, task, record in sorted(item for part in ranks.gather(mine) for item in part):
            scored.setdefault(task, []).append(record)
        for task, records in sorted(scored.items()):
            stats = summarize(records)
            results.append(EvalResult(
                task=task, budget_ms=budget, n=len(records), score=float(np.mean([r.score for r in records])),
                latency_mean_ms=stats["latency_mean_ms"], latency_p95_ms=stats["latency_p95_ms"],
                violation_rate=stats["violation_rate"], controller_ms_mean=stats["controller_ms_mean"],
                plans=dict(Counter(r.plan.key for r in records).most_common()),
            ))  # fmt: skip
    return results


# ----------------------------------------------------------------------------------------------------
# The run folder and the loop
# ----------------------------------------------------------------------------------------------------

METRIC_COLUMNS = (
    "step", "reward_mean", "score_mean", "latency_mean_ms", "violation_rate", "entropy", "updated",
    "pg_loss", "kl", "clip_frac", "lr", "seconds",
)  # fmt: skip


def metrics_row(step: int, stats: StepStats, lr: float, seconds: float) -> dict[str, Any]:
    loss = stats.loss
    return {
        "step": step, "reward_mean": round(stats.reward_mean, 5), "score_mean": round(stats.score_mean, 5),
        "latency_mean_ms": round(stats.latency_mean_ms, 3), "violation_rate": round(stats.violation_rate, 5),
        "entropy": round(stats.entropy, 5), "updated": int(stats.updated),
        "pg_loss": "" if loss is None else round(loss.pg_loss, 6), "kl": "" if loss is None else round(loss.kl, 6),
        "clip_frac": "" if loss is None else round(loss.clip_frac, 5), "lr": lr, "seconds": round(seconds, 2),
    }  # fmt: skip


def plot_curves(metrics: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics)
    steps = [int(r["step"]) for r in rows]
    panels = (("reward_mean", "reward"), ("score_mean", "task score"), ("latency_mean_ms", "latency (ms)"),
              ("violation_rate", "budget violation rate"))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (column, label) in zip(axes, panels):
        plot_with_mean(ax, steps, [float(r[column]) for r in rows], max(1, len(rows) // 10))
        ax.set(xlabel="step", title=label)
    fig.suptitle("GRPO: sampled plans per step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.settings = root / "settings.json"
        self.state = root / "state.pt"
        self.metrics = root / "metrics.csv"
        self.artifact = root / "controller.json"
        self.eval_csv = root / "eval.csv"
        self.eval_json = root / "eval.json"
        self.curves = root / "curves.png"
        self.tensorboard = root / "tensorboard"


def train(out: Path, cfg: TrainConfig, device: str | None = None, dtype: str | None = None) -> Path:
    """Train (or resume) the run in `out`, write the artifact, evaluate it; returns the artifact path. One
    run at a time per run folder: a second one is refused (`runlog.FolderInUse`). Under a launcher (several
    ranks) every rank calls this; `device` is then each rank's own."""
    ranks = init(device)
    with exclusive(out, "python -m lmms_adaptive.train") if ranks.main else nullcontext():
        return _train(RunFolder(out), cfg, ranks, dtype)


def _train(run: RunFolder, cfg: TrainConfig, ranks: Ranks, dtype: str | None) -> Path:
    out = run.root
    if ranks.world > cfg.group_size * cfg.requests_per_step:
        raise ValueError(
            f"{ranks.world} processes for {cfg.group_size * cfg.requests_per_step} rollouts a step "
            "(group_size x requests_per_step): launch at most that many"
        )
    rt = AdaptiveMolmoe.from_pretrained(cfg.pretrained, device=ranks.device, dtype=dtype)
    samples = load_samples(cfg.tasks, cfg.include_path, cfg.limit, cfg.seed)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        check_settings(run.settings, json.loads(json.dumps(asdict(cfg))))  # after the inputs proved loadable
    ranks.barrier()  # the settings are checked before any rank resumes from the state
    env = MolmoeEnvironment(rt, samples, cfg.max_new_tokens)
    grpo_cfg = cfg.grpo()
    torch.manual_seed(cfg.seed)
    policy = TwoStagePolicy(rt.knobs, PolicyDims(d_model=rt.model.config.d_model), grpo_cfg.budget_range_ms)
    trainer = GRPORun(policy, env, grpo_cfg, cfg.steps, ranks)
    if run.state.is_file():
        trainer.load_state_dict(torch.load(run.state, weights_only=True))
        log.info("resuming %s at step %d", out, trainer.step)
    if ranks.main:
        truncate_csv(run.metrics, trainer.step)  # rows logged after the saved state (all of them without one)
    if not trainer.done:
        rt.warmup([rt.knobs.full_plan(c) for c in rt.knobs.tiers])
    elapsed = float(read_rows(run.metrics)[-1]["seconds"]) if run.metrics.is_file() and trainer.step else 0.0
    began = time.perf_counter() - elapsed
    bar = progress(total=cfg.steps, initial=trainer.step, desc="grpo", unit="step", disable=not ranks.main)
    board = TensorBoardCurves(run.tensorboard, "grpo", trainer.step) if ranks.main else None
    while not trainer.done:
        lr = trainer.schedule.get_last_lr()[-1]
        stats = trainer.advance()
        bar.update(1)
        bar.set_postfix(reward=f"{stats.reward_mean:.2f}", violations=f"{stats.violation_rate:.2f}", refresh=False)
        if not ranks.main:  # rank 0 alone writes the run folder
            continue
        row = metrics_row(trainer.step - 1, stats, lr, time.perf_counter() - began)
        write_rows(run.metrics, [row], METRIC_COLUMNS)
        board.add(row)
        if trainer.step % cfg.save_every == 0 or trainer.done:
            save_atomic(trainer.state_dict(), run.state)
    bar.close()
    if ranks.main:
        board.close()
        write_artifact(run, policy, rt, cfg, len(samples))
    if cfg.eval_tasks:
        eval_samples = load_samples(cfg.eval_tasks, cfg.include_path, cfg.eval_limit, cfg.seed)
        results = evaluate(
            rt, GRPOController(policy, rt.question_summary), eval_samples, cfg.eval_budgets(), cfg.max_new_tokens, ranks
        )
        if ranks.main:
            write_eval(results, run)
            print(eval_table(results))
    return run.artifact


def write_artifact(
    run: RunFolder, policy: TwoStagePolicy, rt: AdaptiveMolmoe, cfg: TrainConfig, n_samples: int
) -> None:
    """controller.json (with how it was trained) and curves.png of the finished run."""
    training = {
        "tasks": list(cfg.tasks), "n_samples": n_samples, "steps": cfg.steps, "group_size": cfg.group_size,
        "requests_per_step": cfg.requests_per_step, "plans_run": cfg.steps * cfg.group_size * cfg.requests_per_step,
        "seconds": float(read_rows(run.metrics)[-1]["seconds"]), "settings": asdict(cfg),
    }  # fmt: skip
    artifact = policy.to_artifact(rt.model_id, device=rt.device_name, training=training)
    run.artifact.write_text(json.dumps(artifact) + "\n")
    log.info("controller artifact: %s; curves: %s", run.artifact, plot_curves(run.metrics, run.curves))


def write_eval(results: Sequence[EvalResult], run: RunFolder) -> None:
    run.eval_json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    columns = [f.name for f in fields(EvalResult) if f.name != "plans"] + ["top_plan"]
    rows = [{**{k: v for k, v in asdict(r).items() if k != "plans"}, "top_plan": next(iter(r.plans))} for r in results]
    write_rows(run.eval_csv, rows, columns, mode="w")


def eval_table(results: Sequence[EvalResult]) -> str:
    lines = [
        "| task | budget ms | n | score | mean ms | p95 ms | violations | controller ms | plans |",
        "|---" * 9 + "|",
    ]
    for r in results:
        plans = ", ".join(f"{k} x{n}" for k, n in list(r.plans.items())[:3])
        lines.append(
            f"| {r.task} | {r.budget_ms:g} | {r.n} | {r.score:.3f} | {r.latency_mean_ms:.1f} | {r.latency_p95_ms:.1f} "
            f"| {r.violation_rate:.2f} | {r.controller_ms_mean:.2f} | {plans} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Settings: defaults < YAML file < command-line flags
# ----------------------------------------------------------------------------------------------------


def _convert(kind: str, value: Any) -> Any:
    """A YAML or command-line value as the field type `kind` (TrainConfig's annotations, e.g. "int | None",
    "tuple[float, ...]"): None / "none" / "" clear an optional field or empty a list."""
    optional, base = kind.endswith(" | None"), kind.removesuffix(" | None")
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        if base.startswith("tuple["):
            return ()
        raise ValueError("a value is required")
    if base.startswith("tuple["):
        item = float if base.startswith("tuple[float") else str
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(item(str(v).strip()) for v in items if str(v).strip())
    return {"int": int, "float": float, "str": str}[base](value)


def load_settings(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's settings: TrainConfig defaults, then a YAML mapping of field names, then flags given."""
    defaults = TrainConfig()
    values = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)}
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    given: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"--config {path}: not a readable YAML file ({err})") from err
        if not isinstance(raw, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(values))
        if unknown:
            raise ValueError(f"--config {path}: unknown settings {unknown}; known: {', '.join(values)}")
        given.update(raw)
    given.update(overrides)
    for name, value in given.items():
        try:
            values[name] = _convert(kinds[name], value)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"setting {name}={value!r}: expected a value like {getattr(defaults, name)!r} ({err})"
            ) from err
    return TrainConfig(**values)


SETTING_HELP = {
    "pretrained": "checkpoint folder or hub id (default: the built-in tiny model)",
    "tasks": "lmms-eval tasks to train on, comma-separated",
    "include_path": "folders of task YAMLs, comma-separated (default: the source checkout's tasks/ when there is one)",
    "limit": "training samples per task, a seeded draw (default: all)",
    "eval_tasks": "held-out tasks the trained controller is evaluated on, comma-separated; empty for none",
    "eval_limit": "evaluation samples per task; none for all",
    "eval_budgets_ms": "evaluation budgets in ms, comma-separated (default: 5 spread log-evenly over --budget-range-ms)",
    "steps": "GRPO steps",
    "group_size": "plans sampled per request, each judged against its group",
    "requests_per_step": "requests drawn per step, each with a log-uniform budget",
    "budget_range_ms": "LOW,HIGH range of training budgets in ms",
    "lr": "learning rate; the stage-1 head's is lr x stage1_lr_scale",
    "stage1_lr_scale": "the stage-1 head's learning rate relative to --lr",
    "clip_eps": "PPO-style ratio clip",
    "kl_coef": "weight of the KL penalty to the policy at the start of training",
    "entropy_coef": "weight of the entropy bonus",
    "epochs": "clipped updates on each step's groups",
    "advantages": "std: each group's rewards centred and divided by their std; centred: centred only",
    "penalty": "constant reward penalty of a request over its budget",
    "penalty_per_overshoot": "added penalty per unit of relative overshoot, latency / budget - 1",
    "penalty_cap": "the relative overshoot counted at most",
    "latency_cost": "reward lost to a full budget of latency within it (spend latency only where it buys score)",
    "max_new_tokens": "the generation limit when a task's gen_kwargs set none",
    "save_every": "steps between saved states (the resume points)",
    "seed": "seed of the policy, the sample and budget draws",
}


def parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m lmms_adaptive.train",
        description=__doc__.split("\n\n")[0],
        epilog="Re-running with the same folder and settings resumes from the last saved step.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("out", type=Path, help="run folder (settings, state, logs, controller.json, eval)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file of settings, the names below with _; flags override it (default: none)")  # fmt: skip
    p.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda when available); not part of the run's settings"
    )
    p.add_argument("--dtype", default=None, help="bf16 / fp32 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = SETTING_HELP[f.name]
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=argparse.SUPPRESS,
            help=text if "(default" in text else f"{text} (default: {shown})",
        )
    return p


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = vars(parser().parse_args(sys.argv[1:] if argv is None else argv))
    setup_logging()
    out, config, device, dtype = args.pop("out"), args.pop("config"), args.pop("device"), args.pop("dtype")
    try:
        cfg = load_settings(config, args)
    except ValueError as err:
        raise SystemExit(f"python -m lmms_adaptive.tools.train: {err}") from None
    artifact = train(out, cfg, device, dtype)
    if init().main:
        run = RunFolder(out)
        written = [p.name for p in (run.metrics, run.curves, run.eval_csv, run.tensorboard) if p.exists()]
        log.info(
            "train: %d steps; %s and %s in %s; took %s",
            cfg.steps,
            artifact.name,
            ", ".join(written),
            out,
            took(started),
        )
        print(artifact)


if __name__ == "__main__":
    main()
