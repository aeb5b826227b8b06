"""Decode and prefill speed of the plugin's request path against its own floor and transformers' OLMoE.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py --size mid --json /tmp/speed_mid.json

One random-weight model (`knob_latency.py`'s sizes). In one interleaved run it measures:
- the memory read bandwidth of this machine (a streaming sum over a buffer larger than the caches), and from
  it each plan's weight-read floor: the bytes one decode token reads (`knob_latency.decode_weight_params`)
  over that bandwidth;
- the warm-up of the compiled decode (`AdaptiveMolmoe.warmup_decode`: one graph per top-k option);
- per-token decode of requests served through `serving.request.serve` (what the plugin runs), eager and
  compiled, at k = 8 and 4 and at 16 and 12 blocks;
- the decoder prefill (blocks + final norm + last-position logits over the embedded prompt, into a KV cache)
  against `transformers.OlmoeForCausalLM` holding the same weights (logits compared), same prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.model import MolmoeForCausalLM
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig
from lmms_adaptive.serving.request import Request, serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knob_latency import QUESTION, build_runtime, decode_weight_params, synthetic_image  # noqa: E402

log = logging.getLogger("decode_speed")


@dataclass
class DecodeRow:
    """Median per-token decode of one plan, eager and compiled, against the weight-read floor."""

    top_k: int
    blocks: int
    eager_ms: float
    compiled_ms: float
    weight_mb: float
    floor_ms: float
    eager_x_floor: float
    compiled_x_floor: float
    eager_best_ms: float  # the fastest pass: on a shared machine the least disturbed one
    compiled_best_ms: float


@dataclass
class Report:
    size: str
    threads: int
    torch_version: str
    read_gbps: float
    warmup_s: float
    decode: list[DecodeRow]
    prompt_tokens: int
    prefill_ms: float
    olmoe_prefill_ms: float | None  # None: transformers has no OlmoeForCausalLM here
    prefill_vs_olmoe: float | None
    olmoe_max_logit_diff: float | None
    ratios: dict[str, float]


def read_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """Streaming read bandwidth: the best of `repeats` sums over a float32 buffer of `mbytes` MB."""
    buf = torch.ones(mbytes * 2**18)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def decode_ms(rt: AdaptiveMolmoe, image: np.ndarray, plan: Plan, new_tokens: int) -> float:
    """Median per-token decode of one request served through the plugin's path."""
    request = Request(QUESTION, (image,), gen=GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False))
    return statistics.median(serve(rt, StaticController(plan, rt.knobs), request).record.decode_ms)


def olmoe_twin(model: MolmoeForCausalLM):
    """transformers' OlmoeForCausalLM at the decoder's shapes holding the same weights (None if unavailable)."""
    try:
        from transformers import OlmoeConfig, OlmoeForCausalLM
    except ImportError:
        return None
    c = model.config
    config = OlmoeConfig(
        vocab_size=c.embedding_size, hidden_size=c.d_model, intermediate_size=c.expert_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
        num_experts=c.moe_num_experts, num_experts_per_tok=c.moe_top_k, rms_norm_eps=c.layer_norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_sequence_length, norm_topk_prob=False,
        tie_word_embeddings=False, pad_token_id=None, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    twin = OlmoeForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for block, layer in zip(model.model.transformer.blocks, twin.model.layers, strict=True):
            a, m, s = block.attn, block.mlp, layer.self_attn
            q, k, v = a.att_proj.weight.chunk(3, dim=0)
            pairs = [(s.q_proj.weight, q), (s.k_proj.weight, k), (s.v_proj.weight, v),
                     (s.o_proj.weight, a.attn_out.weight), (s.q_norm.weight, a.q_norm.weight),
                     (s.k_norm.weight, a.k_norm.weight), (layer.input_layernorm.weight, a.attn_norm.weight),
                     (layer.post_attention_layernorm.weight, m.ff_norm.weight), (layer.mlp.gate.weight, m.gate.weight),
                     (layer.mlp.experts.gate_up_proj, m.experts.gate_up),
                     (layer.mlp.experts.down_proj, m.experts.down)]  # fmt: skip
            for dst, src in pairs:
                dst.copy_(src)
        twin.model.norm.weight.copy_(model.model.transformer.ln_f.weight)
        twin.lm_head.weight.copy_(model.lm_head.weight)
    return twin


def ours_prefill(model: MolmoeForCausalLM, rt: AdaptiveMolmoe, x: torch.Tensor) -> torch.Tensor:
    """The runtime's decoder prefill at the full plan: blocks into a fresh cache, final norm, last logits."""
    n = x.shape[1]
    cache = model.new_cache(n + 1)
    schedule = rt.schedule(rt.knobs.full_plan())
    rope = model.rope(torch.arange(n)[None])
    hidden = model.run_blocks(x, rope, schedule.layers, schedule.renormalize, cache)
    return model.logits(model.final_norm(hidden)[0, -1]).float()


def olmoe_prefill(twin, x: torch.Tensor) -> torch.Tensor:
    return twin(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits[0, -1].float()


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1e3, out


@torch.inference_mode()
def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rt = build_runtime(args.size, torch.device("cpu"), torch.float32, args.seed)
    model, knobs = rt.model, rt.knobs
    compiled = AdaptiveMolmoe(model, rt.processor, rt.drop_order, rt.model_id, compile_decode=True)
    if args.cold:
        torch._inductor.config.force_disable_caches = True
    warmup_s = compiled.warmup_decode()

    image = synthetic_image(args.image, args.seed)
    top, low = knobs.model_top_k, knobs.top_k_options[0]
    plans = [Plan(knobs.tiers[0], k, b, 1) for k in (top, low) for b in (knobs.n_layers, knobs.min_blocks)]
    request = rt.processor(QUESTION, [image], max_crops=knobs.tiers[-1])
    x = rt._embed_prompt(request)
    twin = olmoe_twin(model)

    eager_runs: dict[Plan, list[float]] = {p: [] for p in plans}
    compiled_runs: dict[Plan, list[float]] = {p: [] for p in plans}
    prefill, olmoe, bandwidth = [], [], []
    for rt_ in (rt, compiled):  # untimed: first-request allocations
        decode_ms(rt_, image, plans[0], 3)
    for _ in tqdm(range(args.repeats), desc="interleaved passes", unit="pass"):
        bandwidth.append(read_gbps())
        for plan in plans:
            eager_runs[plan].append(decode_ms(rt, image, plan, args.new_tokens))
            compiled_runs[plan].append(decode_ms(compiled, image, plan, args.new_tokens))
        ms, ours_logits = timed(ours_prefill, model, rt, x)
        prefill.append(ms)
        if twin is not None:
            ms, twin_logits = timed(olmoe_prefill, twin, x)
            olmoe.append(ms)

    gbps = statistics.median(bandwidth)
    element = torch.finfo(model.lm_head.weight.dtype).bits // 8
    rows = []
    for plan in plans:
        weight = decode_weight_params(model.config, rt.schedule(plan)) * element
        floor = weight / (gbps * 1e9) * 1e3
        eager, comp = statistics.median(eager_runs[plan]), statistics.median(compiled_runs[plan])
        best = min(eager_runs[plan]), min(compiled_runs[plan])
        rows.append(
            DecodeRow(plan.top_k, plan.n_blocks, eager, comp, weight / 1e6, floor, eager / floor, comp / floor, *best)
        )
    by = {(r.top_k, r.blocks): r for r in rows}
    full, n, m = by[(top, knobs.n_layers)], knobs.n_layers, knobs.min_blocks
    ratios = {
        f"compiled k={low} / k={top}": by[(low, n)].compiled_ms / full.compiled_ms,
        f"compiled {m} / {n} blocks": by[(top, m)].compiled_ms / full.compiled_ms,
        f"eager k={low} / k={top}": by[(low, n)].eager_ms / full.eager_ms,
        f"eager {m} / {n} blocks": by[(top, m)].eager_ms / full.eager_ms,
        "compiled / eager (full plan)": full.compiled_ms / full.eager_ms,
    }
    ours_ms = statistics.median(prefill)
    olmoe_ms = statistics.median(olmoe) if olmoe else None
    report = Report(
        size=args.size, threads=torch.get_num_threads(), torch_version=torch.__version__, read_gbps=gbps,
        warmup_s=warmup_s, decode=rows, prompt_tokens=x.shape[1], prefill_ms=ours_ms, olmoe_prefill_ms=olmoe_ms,
        prefill_vs_olmoe=ours_ms / olmoe_ms if olmoe_ms else None,
        olmoe_max_logit_diff=float((ours_logits - twin_logits).abs().max()) if twin is not None else None,
        ratios=ratios,
    )  # fmt: skip
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
        log.info("wrote %s", args.json)
    return report


def print_report(r: Report) -> None:
    print(f"\n{r.size}, fp32, {r.threads} thread(s), torch {r.torch_version}; read bandwidth {r.read_gbps:.1f} GB/s; "
          f"compiled decode warm-up (every top-k) {r.warmup_s:.1f} s")  # fmt: skip
    print(f"{'k':>2} {'blocks':>6} {'weights MB':>10} {'floor ms':>8} {'eager ms':>8} {'compiled ms':>11} "
          f"{'eager/floor':>11} {'compiled/floor':>14} {'best eager':>10} {'best compiled':>13}")  # fmt: skip
    for d in r.decode:
        print(f"{d.top_k:>2} {d.blocks:>6} {d.weight_mb:>10.1f} {d.floor_ms:>8.2f} {d.eager_ms:>8.2f} "
              f"{d.compiled_ms:>11.2f} {d.eager_x_floor:>11.2f} {d.compiled_x_floor:>14.2f} {d.eager_best_ms:>10.2f} "
              f"{d.compiled_best_ms:>13.2f}")  # fmt: skip
    for name, value in r.ratios.items():
        print(f"{name}: {value:.3f}")
    olmoe = "-" if r.olmoe_prefill_ms is None else f"{r.olmoe_prefill_ms:.1f} ms"
    ratio = "-" if r.prefill_vs_olmoe is None else f"{r.prefill_vs_olmoe:.3f}"
    print(f"decoder prefill, {r.prompt_tokens} tokens: ours {r.prefill_ms:.1f} ms, transformers OlmoeForCausalLM "
          f"{olmoe} (ours / OLMoE {ratio}, max logit difference {r.olmoe_max_logit_diff})")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/decode_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("mid", "tiny"), default="mid", help="model shapes (default: mid)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON here")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved passes; medians are reported (default 5)")
    p.add_argument("--image", default="640x480", metavar="WxH", help="synthetic image size (default 640x480)")
    p.add_argument("--cold", action="store_true", help="time the warm-up without inductor's on-disk caches")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


if __name__ == "__main__":
    main()
