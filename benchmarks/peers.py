"""Our decode and decoder prefill beside peers at the same shapes, timed in one interleaved run.

    OMP_NUM_THREADS=1 python benchmarks/peers.py --size mid --device cpu --json /tmp/peers_mid.json
    python benchmarks/peers.py --size full --device cuda --original /path/to/molmoe-remote-code

Peers, all with random weights (latency depends on shapes only):
- `olmoe`: transformers' `OlmoeForCausalLM` with our decoder's shapes (width, heads, blocks, experts x
  hidden, vocabulary, QK norms), decoder only: the prompt is as many random token ids as ours has tokens;
- `original` (with `--original DIR`, a folder holding the original HF remote code of MolmoE-1B-0924:
  `config_molmoe.py`, `modeling_molmoe.py`): our random checkpoint saved, loaded by that code through
  `trust_remote_code`, and run on our processor's inputs (vision included in its prefill).
Ours runs through the one request path (`serving.request.serve`, a static plan at the highest tier and
all blocks). For each top-k: decoder prefill (prompt -> first token's logits; ours excludes the vision
stage) and decode ms/token (median of a request's steps), medians over `--repeats` interleaved passes
(impl inside k inside pass), and each peer's ratio to ours.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from knob_latency import QUESTION, build_runtime, int_list, model_config, synthetic_image, write_rows_json
from tqdm import tqdm

from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.checkpoint import save_weights
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe, Clock, GenerationConfig, resolve_dtype
from lmms_adaptive.serving.request import Request, serve

log = logging.getLogger("peers")


@dataclass
class Row:
    """One implementation at one top-k (medians over the passes), as printed and written to JSON."""

    impl: str  # "ours", "olmoe" or "original"
    top_k: int
    size: str
    device_name: str
    dtype: str
    n_prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_ms: float  # decoder over the prompt to the first token's logits ("original": vision included)
    decode_ms_per_token: float
    x_prefill: float | None = None  # this row / ours at the same k
    x_decode: float | None = None


@dataclass
class Timing:
    prefill_ms: float
    decode_ms: list[float]


# ----------------------------------------------------------------------------------------------------
# The implementations, each a function (top_k) -> Timing
# ----------------------------------------------------------------------------------------------------


def ours(rt: AdaptiveMolmoe, image: np.ndarray, tier: int, new_tokens: int) -> Callable[[int], Timing]:
    def run(top_k: int) -> Timing:
        plan = Plan(max_crops=tier, top_k=top_k, n_blocks=rt.knobs.n_layers, insert_pos=1)
        request = Request(QUESTION, (image,), gen=GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False))
        t = serve(rt, StaticController(plan, rt.knobs), request).execution.timings
        return Timing(t.prefill_ms, t.decode_ms)

    return run


def olmoe_model(config: MolmoeConfig, device: torch.device, dtype: torch.dtype, seed: int):
    """transformers' OLMoE with MolmoE's decoder shapes and its own random initialisation (no vision backbone).
    Built on the device, not on the meta device: its rotary tables are buffers computed at construction."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    peer_config = OlmoeConfig(
        vocab_size=config.embedding_size + config.additional_vocab_size, hidden_size=config.d_model,
        intermediate_size=config.expert_hidden, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        max_position_embeddings=config.max_sequence_length, rope_theta=config.rope_theta,
        rms_norm_eps=config.layer_norm_eps, num_experts=config.moe_num_experts,
        num_experts_per_tok=config.moe_top_k, norm_topk_prob=False, tie_word_embeddings=False, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = OlmoeForCausalLM(peer_config)
    return model.to(dtype).eval().requires_grad_(False)


def set_top_k(model: torch.nn.Module, top_k: int) -> None:
    """Every MoE of a transformers model routes to `top_k` experts (the attribute its blocks read)."""
    touched = 0
    for module in model.modules():
        if hasattr(module, "top_k"):
            module.top_k = top_k
            touched += 1
    if not touched:
        raise RuntimeError(f"{type(model).__name__}: no module has a top_k attribute to set")
    model.config.num_experts_per_tok = top_k


def olmoe_inputs(model, n_prompt: int) -> dict:
    """`n_prompt` random token ids; logits of the last position only, like our prefill."""
    ids = torch.randint(0, model.config.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(model.lm_head.weight.device), "logits_to_keep": 1}


def hf_greedy(model, prompt: dict, new_tokens: int, clock: Clock) -> Callable[[int], Timing]:
    """Greedy decoding with a transformers model's own forward and KV cache: the prefill over `prompt` (the
    forward's keyword arguments), then one forward per token."""

    # transformers 5.x renames `past_key_values` to `cache` in the forward and its output (the old names warn);
    # remote code written for 4.x knows only the old one
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def run(top_k: int) -> Timing:
        set_top_k(model, top_k)
        start = clock.now()
        out = model(**prompt, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = clock.now() - start
        cache, steps = getattr(out, cache_arg), []
        for _ in range(new_tokens - 1):
            start = clock.now()
            out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
            token, cache = out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, cache_arg)
            steps.append(clock.now() - start)
        return Timing(prefill, steps)

    return run


def original_model(rt: AdaptiveMolmoe, size: str, code: Path, folder: Path):
    """Our random checkpoint saved to `folder` with the original remote code beside it, loaded by that code."""
    from transformers import AutoModelForCausalLM

    missing = [name for name in ("config_molmoe.py", "modeling_molmoe.py") if not (code / name).is_file()]
    if missing:
        raise SystemExit(
            f"--original {code}: expected the MolmoE remote code files there, missing {', '.join(missing)}"
        )
    save_weights(rt.model, folder, rt.model.lm_head.weight.dtype)
    for file in code.glob("*.py"):
        shutil.copyfile(file, folder / file.name)
    config = model_config(size, rt.model.config.vocab_size)
    config["auto_map"] = {
        "AutoConfig": "config_molmoe.MolmoConfig",
        "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, torch_dtype=rt.model.lm_head.weight.dtype
    )
    return model.to(rt.device).eval().requires_grad_(False)


def original_inputs(rt: AdaptiveMolmoe, image: np.ndarray, tier: int) -> dict:
    """The original forward's inputs for our request: our processor's output (golden-tested to match the
    original processor's)."""
    request = rt.processor(QUESTION, [image], max_crops=tier)
    arrays = {"input_ids": request.input_ids, "images": request.images, "image_masks": request.image_masks,
              "image_input_idx": request.image_input_idx}  # fmt: skip
    return {name: torch.as_tensor(value, device=rt.device)[None] for name, value in arrays.items()}


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def measure(impls: dict[str, Callable[[int], Timing]], top_ks, repeats: int) -> dict[tuple[str, int], list[Timing]]:
    """One untimed pass, then `repeats` passes of every (k, impl), interleaved."""
    for k in top_ks:
        for run in impls.values():
            run(k)
    runs: dict[tuple[str, int], list[Timing]] = {(name, k): [] for k in top_ks for name in impls}
    with tqdm(total=repeats * len(runs), desc="peers", unit="run") as bar:
        for _ in range(repeats):
            for k in top_ks:
                for name, run in impls.items():
                    runs[name, k].append(run(k))
                    bar.update()
    return runs


def summarise(runs: dict[tuple[str, int], list[Timing]], meta: dict) -> list[Row]:
    rows = [
        Row(
            impl=name,
            top_k=k,
            **meta,
            repeats=len(timings),
            prefill_ms=statistics.median(t.prefill_ms for t in timings),
            decode_ms_per_token=statistics.median(statistics.median(t.decode_ms) for t in timings),
        )  # fmt: skip
        for (name, k), timings in runs.items()
    ]
    base = {r.top_k: r for r in rows if r.impl == "ours"}
    for r in rows:
        r.x_prefill = r.prefill_ms / base[r.top_k].prefill_ms
        r.x_decode = r.decode_ms_per_token / base[r.top_k].decode_ms_per_token
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'impl':<9} {'k':>2} {'prefill_ms':>11} {'decode_ms/tok':>14} {'x_prefill':>10} {'x_decode':>9}")
    for r in sorted(rows, key=lambda r: (-r.top_k, r.impl != "ours", r.impl)):
        print(f"{r.impl:<9} {r.top_k:>2} {r.prefill_ms:>11.1f} {r.decode_ms_per_token:>14.2f} "
              f"{r.x_prefill:>10.2f} {r.x_decode:>9.2f}")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/peers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "mid", "tiny"), default="mid", help="model shapes (default: mid)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available",
    )  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--top-k", type=int_list, default=(8, 4), help="top-k values (default 8,4)")
    p.add_argument(
        "--image", default="640x480", metavar="WxH", help="synthetic image of our requests (default 640x480)"
    )
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; medians are reported (default 5)")
    p.add_argument("--original", type=Path, metavar="DIR", help="folder with the original remote code, run as a peer")
    p.add_argument("--no-olmoe", action="store_true", help="leave transformers' OLMoE out")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as a JSON list here")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    if args.size == "full" and args.device == "cpu":
        p.error("--size full runs on --device cuda (on a CPU it needs ~29 GB per model in fp32)")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    clock = Clock(device)
    rt = build_runtime(args.size, device, dtype, args.seed)
    image = synthetic_image(args.image, args.seed)
    tier = max(rt.knobs.tiers)
    n_prompt = rt.processor(QUESTION, [image], max_crops=tier).n_tokens
    if max(args.top_k) > rt.model.config.moe_top_k:
        raise SystemExit(f"--top-k: the model routes to at most {rt.model.config.moe_top_k} experts")
    impls = {"ours": ours(rt, image, tier, args.new_tokens)}
    if not args.no_olmoe:
        peer = olmoe_model(rt.model.config, device, dtype, args.seed)
        impls["olmoe"] = hf_greedy(peer, olmoe_inputs(peer, n_prompt), args.new_tokens, clock)
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        if args.original:
            model = original_model(rt, args.size, args.original, Path(tmp))
            impls["original"] = hf_greedy(model, original_inputs(rt, image, tier), args.new_tokens, clock)
        runs = measure(impls, args.top_k, args.repeats)
    meta = {
        "size": args.size, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "n_prompt_tokens": n_prompt, "new_tokens": args.new_tokens,
    }  # fmt: skip
    rows = summarise(runs, meta)
    print_table(rows)
    if args.json:
        write_rows_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
