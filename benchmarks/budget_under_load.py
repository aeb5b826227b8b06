"""Budgets under CPU load: the violation rate with and without the budget guard (the slowdown estimate).

    python benchmarks/budget_under_load.py --controller lookup --budget 90 --json /tmp/load.json

The built-in model serves the local synthetic test tasks under a controller and a budget, first on the
machine as it is, then while background processes burn the CPU. In each phase every request is served
twice, back to back in alternating order: once with the budget guard (the controller plans for budget /
slowdown, the slowdown an EWMA of measured over predicted latency) and once without. Reported per phase
and guard: requests, violation rate, mean and p95 latency, mean task score, and the mean slowdown the
guard applied. Run it with OMP_NUM_THREADS=1 on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from knob_latency import write_rows_json
from tqdm import tqdm

from lmms_adaptive import controllers
from lmms_adaptive.controllers.guard import BudgetGuard, checkpoint_estimator
from lmms_adaptive.core.runtime import AdaptiveMolmoe
from lmms_adaptive.integration.tasks import TaskSample, load_samples
from lmms_adaptive.serving.records import RequestRecord
from lmms_adaptive.serving.request import serve

TASKS = Path(__file__).resolve().parents[1] / "tasks"
log = logging.getLogger("budget_under_load")


@dataclass
class Row:
    phase: str  # "idle" or "loaded (N processes)"
    guard: bool
    requests: int
    violation_rate: float
    latency_mean_ms: float
    latency_p95_ms: float
    score: float
    slowdown_mean: float | None


def burn() -> None:
    while True:
        pass


@contextmanager
def cpu_load(processes: int):
    """`processes` background processes that spin until the block ends."""
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(processes)]
    for p in burners:
        p.start()
    try:
        yield
    finally:
        for p in burners:
            p.terminate()
            p.join()


def phase(rt, controller, samples: list[TaskSample], budget: float, guard: BudgetGuard, max_new_tokens: int):
    """Each sample with and without the guard, in alternating order; (record, score) lists per guard."""
    runs: dict[bool, list[tuple[RequestRecord, float]]] = {True: [], False: []}
    for i, sample in enumerate(tqdm(samples, desc="requests", unit="sample")):
        request = sample.request(budget, max_new_tokens)
        for guarded in (True, False) if i % 2 else (False, True):
            served = serve(rt, controller, request, guard if guarded else None)
            runs[guarded].append((served.record, sample.score(served.text)))
    return runs


def row(name: str, guarded: bool, runs: list[tuple[RequestRecord, float]]) -> Row:
    total = [r.total_ms for r, _ in runs]
    slowdowns = [r.slowdown for r, _ in runs if r.slowdown is not None]
    return Row(
        phase=name, guard=guarded, requests=len(runs), violation_rate=float(np.mean([r.violated for r, _ in runs])),
        latency_mean_ms=float(np.mean(total)), latency_p95_ms=float(np.percentile(total, 95)),
        score=float(np.mean([s for _, s in runs])), slowdown_mean=statistics.fmean(slowdowns) if slowdowns else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python benchmarks/budget_under_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--controller", default="lookup", help="a controller kind or artifact path (default lookup)")
    p.add_argument("--budget", type=float, default=90.0, help="budget per request in ms (default 90)")
    p.add_argument(
        "--tasks", default="synth_vqa_test,synth_pope_test", help="local tasks (default: the synthetic test ones)"
    )
    p.add_argument("--limit", type=int, default=40, help="samples per task (default 40)")
    p.add_argument(
        "--load-processes", type=int, default=2, help="CPU-burning processes in the loaded phase (default 2)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="when the task sets none (default 16)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as a JSON list here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rt = AdaptiveMolmoe.from_pretrained(device="cpu")
    estimator = checkpoint_estimator(rt.folder, rt.model_id)
    if estimator is None:
        raise SystemExit(f"the built-in model has no latency estimator in {rt.folder}")
    controller = controllers.load(args.controller, rt)
    samples = load_samples(args.tasks.split(","), [str(TASKS)], args.limit, seed=0)
    rt.warmup([rt.knobs.full_plan(c) for c in rt.knobs.tiers])
    rows = []
    for name, processes in (("idle", 0), (f"loaded ({args.load_processes} processes)", args.load_processes)):
        guard = BudgetGuard(estimator)  # each phase starts from slowdown 1
        with cpu_load(processes):
            runs = phase(rt, controller, samples, args.budget, guard, args.max_new_tokens)
        rows += [row(name, guarded, runs[guarded]) for guarded in (False, True)]
    print(
        f"controller {args.controller}, budget {args.budget:g} ms, {len(samples)} samples, torch threads {torch.get_num_threads()}"
    )
    print("| phase | guard | requests | over budget | mean ms | p95 ms | score | mean slowdown |\n" + "|---" * 8 + "|")
    for r in rows:
        slowdown = "-" if r.slowdown_mean is None else f"{r.slowdown_mean:.2f}"
        print(f"| {r.phase} | {'on' if r.guard else 'off'} | {r.requests} | {r.violation_rate:.1%} | "
              f"{r.latency_mean_ms:.1f} | {r.latency_p95_ms:.1f} | {r.score:.3f} | {slowdown} |")  # fmt: skip
    if args.json:
        write_rows_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
