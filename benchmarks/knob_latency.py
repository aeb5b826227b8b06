"""Latency of every knob setting of MolmoE: vision tier x MoE top-k x active blocks, at batch size 1.

    python benchmarks/knob_latency.py --size mid --device cpu --json /tmp/knob_mid.json
    python benchmarks/knob_latency.py --size full --device cuda --reference --image 640x480 --image 1280x720

The model has RANDOM weights: latency depends on shapes only, so no checkpoint is needed. Sizes:
`full` is the real MolmoE-1B (7.2B parameters, a GPU job), `mid` a scaled-down MolmoE in the same schema
with the real knob space (16 blocks, 64 experts, top-k 8, tiers 3/6/12) that runs the whole default grid
on a 2-core CPU in minutes, `tiny` the package's tiny test model.

For each plan it reports the median over repeats of vision, prefill, per-token decode (median of the
per-token list of one request) and end-to-end total latency, and the ratios of decode and total to the
full plan (highest tier, model top-k, all blocks) of the same image. `--reference` adds the full plan run
through the per-expert loop of the original implementation, so speed-ups are measured side by side;
`--compile` adds every plan again with the decode step under torch.compile (CUDA graphs on a GPU; one
compiled block step serves every plan, so only the first requests compile). On
CUDA each row also gets its memory-bandwidth floor: the weight bytes one decode token must read divided
by `--peak-gbps`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.checkpoint import build_model
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import LayerSchedule, MolmoeForCausalLM, count_parameters
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.processor import DEFAULT_VISION, MolmoeProcessor, VisionPreprocessConfig
from lmms_adaptive.core.runtime import AdaptiveMolmoe, Generation, GenerationConfig, resolve_dtype
from lmms_adaptive.default.tiny import IMAGE_TOKENS, TINY_PREPROCESSOR, tiny_config, train_tokenizer
from lmms_adaptive.serving.request import Request, serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from moe_oracle import reference_moe  # noqa: E402 (the original per-expert MoE loop lives with the tests)

log = logging.getLogger("knob_latency")

QUESTION = "What is in the image?"
TOKENIZER_VOCAB = 1024
H100_SXM_GBPS = 3350.0

# `mid`: MolmoE's knob space (16 blocks, 64 experts, top-k 8; the processor's tiers 3/6/12) with small
# widths. Experts are wide relative to d_model (mlp_ratio) so that reading the k chosen experts is a
# visible part of a decode step on a CPU, while prefill and the ViT stay cheap enough for the full grid.
MID_DIMS = {
    "d_model": 128, "n_heads": 2, "n_layers": 16, "mlp_ratio": 4, "moe_num_experts": 64, "moe_top_k": 8,
    "vit_layers": [-2, -9],
    "vision_backbone": {"image_emb_dim": 64, "image_head_dim": 16, "image_num_heads": 4,
                        "image_num_key_value_heads": 4, "image_mlp_dim": 128, "image_num_layers": 9,
                        "image_patch_size": 14, "image_pos_patch_size": 14, "image_num_pos": 577},
}  # fmt: skip


@dataclass
class Row:
    """One measured plan (medians over repeats), as printed and written to JSON."""

    size: str
    device: str
    device_name: str
    dtype: str
    torch_version: str
    image: str
    impl: str  # "fast", "compiled" (decode step under torch.compile) or "reference" (per-expert loop)
    max_crops: int
    top_k: int
    active_blocks: int
    n_crops: int
    n_prompt_tokens: int
    new_tokens: int
    repeats: int
    vision_ms: float
    prefill_ms: float
    decode_ms_per_token: float
    total_ms: float
    ratio_decode: float | None = None  # this row / the full fast plan of the same image
    ratio_total: float | None = None
    decode_weight_bytes: int = 0  # weights one decode token reads under this plan
    floor_ms: float | None = None  # decode_weight_bytes / peak bandwidth (CUDA only)
    x_floor: float | None = None  # decode_ms_per_token / floor_ms


@dataclass(frozen=True)
class Case:
    """One thing to time: an image, a plan and which MoE implementation runs it."""

    image: str
    plan: Plan
    impl: str = "fast"


# ----------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------


def model_config(size: str, base_vocab: int) -> dict:
    """The config.json dict of a size; every size keeps the real schema."""
    if size == "tiny":
        return tiny_config(base_vocab)
    if size == "mid":
        config = tiny_config(base_vocab)
        config.update({k: v for k, v in MID_DIMS.items() if k != "vision_backbone"})
        config["vision_backbone"] = {**config["vision_backbone"], **MID_DIMS["vision_backbone"]}
        return config
    if size == "full":
        real = Path(__file__).resolve().parents[1] / "lmms_adaptive" / "resources" / "molmoe_config.json"
        return json.loads(real.read_text())
    raise ValueError(f"unknown size {size!r}")


@torch.no_grad()
def init_random(model: MolmoeForCausalLM, seed: int) -> None:
    """Normal(0, 0.02) weights, zero biases, unit norm scales; generated on the model's device."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1 and "embedding" not in name:  # norm scales
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def build_runtime(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> AdaptiveMolmoe:
    start = time.perf_counter()
    tokenizer = train_tokenizer(TOKENIZER_VOCAB)
    config = MolmoeConfig.from_dict(model_config(size, tokenizer.get_vocab_size() - len(IMAGE_TOKENS)), f"<{size}>")
    n_ids = config.embedding_size + config.additional_vocab_size
    if tokenizer.get_vocab_size() > n_ids:
        raise SystemExit(f"tokenizer has {tokenizer.get_vocab_size()} ids but the {size} model embeds only {n_ids}")
    model = build_model(config, device, dtype)
    init_random(model, seed)
    model.eval().requires_grad_(False)
    log.info(
        "built random %s model: %.1fM parameters, %s %s, %.1fs (d_model %d, %d layers, %d experts x hidden %d, top-k %d; "
        "ViT width %d x %d layers)",
        size, count_parameters(model) / 1e6, device, dtype, time.perf_counter() - start, config.d_model,
        config.n_layers, config.moe_num_experts, config.expert_hidden, config.moe_top_k, config.vision.width,
        config.vision.n_layers,
    )  # fmt: skip
    vision = DEFAULT_VISION
    if size == "tiny":  # the tiny model's 28 px patches (see lmms_adaptive.default.tiny)
        vision = VisionPreprocessConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_PREPROCESSOR.items()}
        )
    return AdaptiveMolmoe(model, MolmoeProcessor(tokenizer, vision), model_id=f"random-{size}")


# ----------------------------------------------------------------------------------------------------
# Bandwidth floor
# ----------------------------------------------------------------------------------------------------


def decode_weight_params(config: MolmoeConfig, schedule: LayerSchedule) -> int:
    """Parameters one decode token reads: per active block attention + router + its k experts, then ln_f,
    lm_head and one embedding row. The KV cache is not counted."""
    d, h = config.d_model, config.expert_hidden
    attention = 3 * d * d + d * d + 3 * d  # att_proj, attn_out, attn/q/k norms
    router = config.moe_num_experts * d + d  # gate, ff_norm
    expert = 3 * d * h  # gate, up, down
    blocks = sum(attention + router + k * expert for _, k in schedule.layers)
    return blocks + d + config.embedding_size * d + d


def add_floor(row: Row, peak_gbps: float) -> None:
    row.floor_ms = row.decode_weight_bytes / (peak_gbps * 1e9) * 1e3
    row.x_floor = row.decode_ms_per_token / row.floor_ms


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def write_rows_json(path: Path, rows: Sequence[Any]) -> None:
    """A benchmark's result rows (dataclasses) as a JSON list, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


def synthetic_image(spec: str, seed: int) -> np.ndarray:
    """'WxH' -> an HxWx3 uint8 noise image (content does not change latency, only the size does)."""
    width, height = parse_size(spec)
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def parse_size(spec: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must look like 640x480, got {spec!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {spec!r}")
    return width, height


def run_once(runtimes: dict[str, AdaptiveMolmoe], image: np.ndarray, case: Case, new_tokens: int) -> Generation:
    """Serve the request under the case's plan with the runtime of its implementation ("reference" is the fast
    runtime with every MoE running the original per-expert loop, the tests' oracle)."""
    rt = runtimes[case.impl]
    request = Request(QUESTION, (image,), gen=GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False))
    with reference_moe(rt.model) if case.impl == "reference" else contextlib.nullcontext():
        return serve(rt, StaticController(case.plan, rt.knobs), request).execution


def measure(
    runtimes: dict[str, AdaptiveMolmoe],
    images: dict[str, np.ndarray],
    cases: list[Case],
    new_tokens: int,
    repeats: int,
    warmup: int,
) -> dict[Case, list]:
    """Warm every case up, then time `repeats` passes over all cases (interleaved, so slow drifts of the
    machine spread over all plans instead of biasing some). The warm-up generates as many tokens as the
    timed runs: the KV cache's capacity bucket depends on it, and a compiled decode step compiles per bucket."""
    for _ in range(warmup):
        for case in tqdm(cases, desc="warm-up", unit="plan", leave=False):
            run_once(runtimes, images[case.image], case, new_tokens)
    runs: dict[Case, list] = {case: [] for case in cases}
    with tqdm(total=len(cases) * repeats, desc="plans", unit="run") as bar:
        for rep in range(repeats):
            bar.set_postfix_str(f"pass {rep + 1}/{repeats}")
            for case in cases:
                runs[case].append(run_once(runtimes, images[case.image], case, new_tokens))
                bar.update()
    return runs


def summarise(case: Case, gens: list, rt: AdaptiveMolmoe, meta: dict, new_tokens: int) -> Row:
    t = [g.timings for g in gens]
    schedule = rt.schedule(case.plan)
    element = torch.finfo(rt.model.lm_head.weight.dtype).bits // 8
    return Row(
        **meta,
        image=case.image,
        impl=case.impl,
        max_crops=case.plan.max_crops,
        top_k=case.plan.top_k,
        active_blocks=case.plan.n_blocks,
        n_crops=gens[0].n_crops,
        n_prompt_tokens=gens[0].n_prompt_tokens,
        new_tokens=new_tokens,
        repeats=len(gens),
        vision_ms=statistics.median(x.vision_ms for x in t),
        prefill_ms=statistics.median(x.prefill_ms for x in t),
        decode_ms_per_token=statistics.median(statistics.median(x.decode_ms) if x.decode_ms else 0.0 for x in t),
        total_ms=statistics.median(x.total_ms for x in t),
        decode_weight_bytes=decode_weight_params(rt.model.config, schedule) * element,
    )


def add_ratios(rows: list[Row], full: Plan) -> None:
    """ratio_* = row / the fast full plan of the same image."""
    base = {
        r.image: r
        for r in rows
        if r.impl == "fast" and (r.max_crops, r.top_k, r.active_blocks) == (full.max_crops, full.top_k, full.n_blocks)
    }
    for r in rows:
        ref = base.get(r.image)
        if ref is not None:
            r.ratio_decode = r.decode_ms_per_token / ref.decode_ms_per_token if ref.decode_ms_per_token else None
            r.ratio_total = r.total_ms / ref.total_ms


# ----------------------------------------------------------------------------------------------------
# Plans and output
# ----------------------------------------------------------------------------------------------------


def build_cases(
    rt: AdaptiveMolmoe, images: Sequence[str], tiers, top_ks, blocks, reference: bool, compiled: bool
) -> list[Case]:
    knobs = rt.knobs
    tiers = tiers or knobs.tiers
    top_ks = top_ks or knobs.top_k_options
    blocks = blocks or tuple(knobs.block_options(1))
    plans = [Plan(max_crops=c, top_k=k, n_blocks=b, insert_pos=1) for c in tiers for k in top_ks for b in blocks]
    full = knobs.full_plan()
    if full not in plans:  # ratios are always taken against the full plan, so it is always measured
        plans.append(full)
    for plan in plans:
        try:
            knobs.validate(plan)
        except ValueError as err:
            raise SystemExit(f"invalid plan {plan}: {err}") from None
    cases = [Case(image, plan) for image in images for plan in plans]
    if reference:
        cases += [Case(image, full, "reference") for image in images]
    if compiled:
        cases += [Case(image, plan, "compiled") for image in images for plan in plans]
    return cases


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row], with_floor: bool) -> None:
    headers = ["image", "impl", "max_crops", "k", "blocks", "crops", "prompt", "vision_ms", "prefill_ms",
               "decode_ms/tok", "total_ms", "x_decode", "x_total"]  # fmt: skip
    if with_floor:
        headers += ["floor_ms", "x_floor"]
    table = []
    for r in rows:
        cells = [r.image, r.impl, str(r.max_crops), str(r.top_k), str(r.active_blocks), str(r.n_crops),
                 str(r.n_prompt_tokens), fmt(r.vision_ms), fmt(r.prefill_ms), fmt(r.decode_ms_per_token, 2),
                 fmt(r.total_ms), fmt(r.ratio_decode, 3), fmt(r.ratio_total, 3)]  # fmt: skip
        if with_floor:
            cells += [fmt(r.floor_ms, 3), fmt(r.x_floor, 2)]
        table.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:  # text columns (image, impl) left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for cells in table:
        print(line(cells))


def print_floor_summary(rows: list[Row], peak_gbps: float, n_layers: int) -> None:
    """Per image and k: the all-blocks, highest-tier row against its bandwidth floor."""
    print(f"\nDecode vs memory-bandwidth floor (weights read per token / {peak_gbps:.0f} GB/s), all {n_layers} blocks:")
    print(f"{'image':<10} {'impl':<9} {'k':>2} {'GB/token':>9} {'floor_ms':>9} {'decode_ms':>10} {'x_floor':>8}")
    for image in dict.fromkeys(r.image for r in rows):
        full_rows = [r for r in rows if r.image == image and r.active_blocks == n_layers]
        if not full_rows:
            continue
        top_tier = max(r.max_crops for r in full_rows)
        for r in sorted((r for r in full_rows if r.max_crops == top_tier), key=lambda r: (r.impl, r.top_k)):
            print(f"{image:<10} {r.impl:<9} {r.top_k:>2} {r.decode_weight_bytes / 1e9:>9.3f} {r.floor_ms:>9.3f} "
                  f"{r.decode_ms_per_token:>10.3f} {r.x_floor:>8.2f}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    """'4,8' or '12..16' (inclusive) or a mix: '3,6,12..14'."""
    values: list[int] = []
    try:
        for part in text.split(","):
            if ".." in part:
                lo, hi = (int(v) for v in part.split(".."))
                values.extend(range(lo, hi + 1))
            elif part.strip():
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,8 or 12..16, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return tuple(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/knob_latency.py",
        description=__doc__.split("\n\n")[0],
        epilog="Knob lists accept '4,8', '12..16' or mixes; when omitted they cover the model's whole knob space "
        "(MolmoE: tiers 3,6,12; top-k 4..8; blocks 12..16 with insertion after block 1).",
    )
    p.add_argument("--size", choices=("full", "mid", "tiny"), default="mid", help="model shapes (default: mid)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available",
    )
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as a JSON list here")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per plan; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over all plans first (default 1)")
    p.add_argument("--tiers", type=int_list, help="max_crops values (default: the model's tiers)")
    p.add_argument("--top-k", type=int_list, help="MoE top-k values (default: the model's options)")
    p.add_argument("--blocks", type=int_list, help="active block counts (default: all options for insert_pos 1)")
    p.add_argument("--image", action="append", metavar="WxH", help="synthetic image size; repeatable (default 640x480)")
    p.add_argument(
        "--reference", action="store_true", help="also time the full plan with the original per-expert MoE loop"
    )
    p.add_argument(
        "--compile", action="store_true", help="also time every plan with the decode step under torch.compile"
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=H100_SXM_GBPS,
        help="peak memory bandwidth for the floor (default 3350, H100 SXM)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    p.add_argument("--force", action="store_true", help="allow --size full on a CPU")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token comes from prefill; decode starts at the second)")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    args.image = list(dict.fromkeys(args.image or ["640x480"]))
    for spec in args.image:
        try:
            parse_size(spec)
        except argparse.ArgumentTypeError as err:
            p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.size == "full" and args.device == "cpu" and not args.force:
        raise SystemExit(
            "--size full is the real 7.2B-parameter MolmoE: on a CPU it needs ~29 GB (fp32) and minutes per request. "
            "Use --device cuda, a smaller --size (mid, tiny), or --force to run it anyway."
        )
    wall = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rt = build_runtime(args.size, device, dtype, args.seed)
    images = {spec: synthetic_image(spec, args.seed) for spec in args.image}
    cases = build_cases(rt, args.image, args.tiers, args.top_k, args.blocks, args.reference, args.compile)
    runtimes = {"fast": rt, "reference": rt, "compiled": AdaptiveMolmoe(rt.model, rt.processor, compile_decode=True)}
    log.info(
        "%d plans x %d repeats (+%d warm-up passes), %d new tokens each",
        len(cases),
        args.repeats,
        args.warmup,
        args.new_tokens,
    )

    with logging_redirect_tqdm():
        runs = measure(runtimes, images, cases, args.new_tokens, args.repeats, args.warmup)

    meta = {
        "size": args.size,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
    }
    rows = [summarise(case, gens, rt, meta, args.new_tokens) for case, gens in runs.items()]
    add_ratios(rows, rt.knobs.full_plan())
    on_cuda = device.type == "cuda"
    if on_cuda:
        for row in rows:
            add_floor(row, args.peak_gbps)

    print_table(rows, with_floor=on_cuda)
    if on_cuda:
        print_floor_summary(rows, args.peak_gbps, rt.model.config.n_layers)
    if args.json:
        write_rows_json(args.json, rows)
        log.info("wrote %d rows to %s", len(rows), args.json)
    log.info("wall time %.1fs", time.perf_counter() - wall)
    return rows


if __name__ == "__main__":
    main()
