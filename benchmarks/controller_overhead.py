"""What the two-stage (grpo) controller costs per request: stage 1, the latency token's row, stage 2.

    python benchmarks/controller_overhead.py --size mid --device cpu --json /tmp/controller_mid.json
    python benchmarks/controller_overhead.py --size full --device cuda --image 640x480 --image 1280x720

Random model weights and a randomly initialised policy (cost depends on shapes only). Each request is
served twice through the one request path (`serving.request.serve`), back to back and in alternating
order: under the grpo controller (request facts, stage 1, DeferredPlan: blocks 0..p-1 with the latency
token appended to the prompt, stage 2, the rest of the plan) and under a static controller with the same
plan. Reported per image (medians): the request facts (token counts per tier from the image size, paid
by both), stage 1, stage 2, their sum, `extra_ms` = total - static total (everything the two-stage
controller adds over a static one, the latency token's row included, measured as a difference of two
end-to-end timings, so a noisy machine blurs it by a few ms), both totals, and extra_ms as a share of
the total.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from knob_latency import QUESTION, build_runtime, parse_size, synthetic_image, write_rows_json
from tqdm import tqdm

from lmms_adaptive.controllers.grpo import GRPOController, PolicyDims, TwoStagePolicy
from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig, resolve_dtype
from lmms_adaptive.serving.request import Request, serve

log = logging.getLogger("controller_overhead")


@dataclass
class Row:
    size: str
    device_name: str
    image: str
    budget_ms: float
    plan: str
    requests: int
    facts_ms: float
    stage1_ms: float
    stage2_ms: float
    controller_ms: float  # stage 1 + stage 2
    extra_ms: float  # median of (total - static total) over the requests: both stages, the latency token's row
    total_ms: float  # the request through the controller, end to end
    static_total_ms: float  # the same plan given statically, timed the same way right before or after it
    overhead_pct: float  # extra_ms / total_ms


def through_controller(
    rt: AdaptiveMolmoe, controller: GRPOController, image, budget: float, gen: GenerationConfig
) -> dict:
    served = serve(rt, controller, Request(QUESTION, (image,), budget, gen))
    record, stage2_ms = served.record, served.execution.timings.stage2_ms
    return {
        "facts_ms": record.facts_ms, "stage1_ms": record.controller_ms - stage2_ms, "stage2_ms": stage2_ms,
        "total_ms": record.total_ms, "plan": record.plan,
    }  # fmt: skip


def one_request(
    rt: AdaptiveMolmoe,
    controller: GRPOController,
    image,
    budget: float,
    gen: GenerationConfig,
    plan: Plan,
    static_first: bool,
) -> dict:
    """The request through the controller and `plan` (what the controller chooses for it) given statically,
    in the given order: alternating the order cancels what the first run of a pair pays for the second."""

    def static() -> float:
        return serve(rt, StaticController(plan, rt.knobs), Request(QUESTION, (image,), budget, gen)).record.total_ms

    if static_first:
        static_ms = static()
        run = through_controller(rt, controller, image, budget, gen)
    else:
        run = through_controller(rt, controller, image, budget, gen)
        static_ms = static()
    if run["plan"] != plan:
        raise RuntimeError(f"the controller chose {run['plan']} for a request it planned as {plan} before")
    return {**run, "static_total_ms": static_ms, "extra_ms": run["total_ms"] - static_ms}


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python benchmarks/controller_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "mid", "tiny"), default="mid", help="model shapes (default: mid)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--image", action="append", metavar="WxH", help="synthetic image size; repeatable (default 640x480)")
    p.add_argument("--budget", type=float, default=200.0, help="budget in ms given to the controller (default 200)")
    p.add_argument("--requests", type=int, default=20, help="timed requests per image (default 20)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request (default 8)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as a JSON list here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    images = list(dict.fromkeys(args.image or ["640x480"]))
    for spec in images:
        parse_size(spec)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    rt = build_runtime(args.size, device, resolve_dtype(args.dtype, device), args.seed)
    policy = TwoStagePolicy(rt.knobs, PolicyDims(d_model=rt.model.config.d_model), (args.budget / 4, args.budget * 4))
    controller = GRPOController(policy, rt.question_summary)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    device_name = rt.device_name
    rows = []
    for spec in images:
        image = synthetic_image(spec, args.seed)
        plan = through_controller(rt, controller, image, args.budget, gen)["plan"]  # and a warm-up
        one_request(rt, controller, image, args.budget, gen, plan, static_first=False)
        runs = [
            one_request(rt, controller, image, args.budget, gen, plan, static_first=i % 2 == 1)
            for i in tqdm(range(args.requests), desc=spec, unit="request")
        ]

        def med(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        plans = {str(r["plan"]) for r in runs}
        rows.append(Row(
            size=args.size, device_name=device_name, image=spec, budget_ms=args.budget, plan=" | ".join(sorted(plans)),
            requests=len(runs), facts_ms=med("facts_ms"), stage1_ms=med("stage1_ms"), stage2_ms=med("stage2_ms"),
            controller_ms=statistics.median(r["stage1_ms"] + r["stage2_ms"] for r in runs), extra_ms=med("extra_ms"),
            total_ms=med("total_ms"), static_total_ms=med("static_total_ms"),
            overhead_pct=100.0 * med("extra_ms") / med("total_ms"),
        ))  # fmt: skip
    header = "| image | facts ms | stage 1 ms | stage 2 ms | controller ms | extra ms | total ms | static total ms | overhead % |"
    print(header + "\n" + "|---" * 9 + "|")
    for r in rows:
        print(f"| {r.image} | {r.facts_ms:.3f} | {r.stage1_ms:.3f} | {r.stage2_ms:.3f} | {r.controller_ms:.3f} | "
              f"{r.extra_ms:.2f} | {r.total_ms:.1f} | {r.static_total_ms:.1f} | {r.overhead_pct:.2f} |")  # fmt: skip
    if args.json:
        write_rows_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
