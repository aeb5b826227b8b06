"""A full-size MolmoE-1B checkpoint from disk: written, loaded through the plugin, one request answered.

    nice -n 10 python benchmarks/full_size.py --like ../shared/molmoe-1b-0924 --json /tmp/full_size.json
    python benchmarks/full_size.py --size mid --json /tmp/full_size_mid.json          # seconds

A random checkpoint in the real layout (every tensor under the name and shape `core.checkpoint` expects
from the real MolmoE-1B-0924, sharded safetensors with `model.safetensors.index.json`, bf16 by default;
~14.4 GB at `--size full`) is streamed to a temporary folder tensor by tensor, so writing it holds one
tensor in memory. A fresh process then loads it through the lmms-eval plugin (`AdaptiveMolmoeLMM`) on the
CPU, answers one request of a local task through lmms-eval (`--limit 1`), and times decoding through the
one request path under the full plan. Reported: load time; the loading process's peak RSS against the
weights' bytes (target <= 1.15x); decode ms/token against its weight-read floor, measured in the same
process as the time to read as many bytes of the loaded weights as one decode token reads. The folder
is deleted afterwards, also on errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from knob_latency import QUESTION, model_config, synthetic_image
from tqdm import tqdm

from lmms_adaptive.core.checkpoint import SAFETENSORS_INDEX, SIDE_FILES
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import MolmoeForCausalLM
from lmms_adaptive.default.tiny import (
    IMAGE_TOKENS,
    tiny_preprocessor_config,
    train_tokenizer,
    write_folder,
)

log = logging.getLogger("full_size")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_VOCAB = 1024
DTYPES = {"bf16": (torch.bfloat16, "BF16"), "fp32": (torch.float32, "F32")}
RSS_TARGET = 1.15
DECODE_IMAGE = "336x336"  # the timed full-plan request: decode does not depend on the image, its prefill does


@dataclass
class Result:
    """One run, as printed and written to JSON (bytes, seconds, milliseconds)."""

    size: str
    dtype: str
    threads: int
    weight_bytes: int
    n_shards: int
    write_s: float
    load_s: float
    baseline_rss_bytes: int  # the measuring process before loading (interpreter, torch, lmms-eval)
    load_peak_rss_bytes: int  # VmHWM right after the plugin loaded the model
    peak_rss_bytes: int  # VmHWM at the end (the request's activations included)
    x_weights: float  # load_peak_rss_bytes / weight_bytes (target <= 1.15)
    x_weights_loading: float  # (load_peak_rss_bytes - baseline_rss_bytes) / weight_bytes
    task: str
    answer: str  # the plugin's answer to the one lmms-eval request (random weights: any text)
    request_total_ms: float
    new_tokens: int
    decode_ms_per_token: float  # median over the decode steps of a full-plan request through `serve`
    decode_compiled: bool  # the decode ran the compiled block step (the plugin's compile=auto)
    decode_weight_bytes: int  # weights one decode token reads under the full plan
    floor_ms: float  # fastest of `--floor-repeats` reads of decode_weight_bytes of the loaded weights
    floor_gbps: float
    x_floor: float
    cleaned: bool  # the temporary checkpoint folder is gone


# ----------------------------------------------------------------------------------------------------
# Writing a random checkpoint, one tensor at a time
# ----------------------------------------------------------------------------------------------------


def write_side_files(folder: Path, size: str, like: Path | None) -> MolmoeConfig:
    """config.json, tokenizer and processor files: copied from `like`, else the size's config with a small
    trained tokenizer (the real preprocessor, or the tiny model's for `tiny`)."""
    if like is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in SIDE_FILES:
            if (like / name).is_file():
                shutil.copyfile(like / name, folder / name)
        return MolmoeConfig.from_folder(folder)
    tokenizer = train_tokenizer(TOKENIZER_VOCAB)
    config = model_config(size, tokenizer.get_vocab_size() - len(IMAGE_TOKENS))
    preprocessor = json.loads((ROOT / "lmms_adaptive" / "resources" / "preprocessor_config.json").read_text())
    write_folder(folder, config, tokenizer, tiny_preprocessor_config() if size == "tiny" else preprocessor)
    return MolmoeConfig.from_folder(folder)


def checkpoint_layout(config: MolmoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the real checkpoint: name -> shape, in name order (no memory: a meta-device model)."""
    with torch.device("meta"):
        slots = MolmoeForCausalLM(config).weight_slots()
    return {name: tuple(slots[name].shape) for name in sorted(slots)}


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal(0, 0.02) weights, zero biases, unit norm scales (latency depends on shapes only)."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and "embedding" not in name:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def write_random_checkpoint(
    folder: Path, layout: dict[str, tuple[int, ...]], dtype: str, shard_bytes: int, seed: int
) -> tuple[int, int]:
    """Stream random tensors into safetensors shards plus `model.safetensors.index.json`; each shard's header
    is written first (shapes are known), then its tensors one by one. Returns (weight bytes, shards)."""
    torch_dtype, name = DTYPES[dtype]
    element = torch_dtype.itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for tensor, shape in layout.items():
        nbytes = math.prod(shape) * element
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    total = sum(math.prod(s) for s in layout.values()) * element
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing") as bar:
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for tensor in names:
                nbytes = math.prod(layout[tensor]) * element
                header[tensor] = {
                    "dtype": name,
                    "shape": list(layout[tensor]),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
            with (folder / file).open("wb") as f:
                f.write(len(encoded).to_bytes(8, "little") + encoded)
                for tensor in names:
                    t = random_tensor(tensor, layout[tensor], torch_dtype, gen)
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
                    bar.update(t.numel() * element)
            weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return total, len(shards)


# ----------------------------------------------------------------------------------------------------
# Measuring, in a fresh process
# ----------------------------------------------------------------------------------------------------


def proc_kib(path: str, key: str) -> int | None:
    """A 'Key: N kB' line of a /proc file in bytes, or None (no /proc, no such line)."""
    file = Path(path)
    lines = file.read_text().splitlines() if file.is_file() else []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(f"{key}:")), None)


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; ru_maxrss where there is no /proc."""
    found = proc_kib("/proc/self/status", key)
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_floor_ms(model: torch.nn.Module, nbytes: int, repeats: int) -> float:
    """Fastest of `repeats` timed reads of `nbytes` bytes of the model's weights (largest tensors first, summed
    as 64-bit integers: every byte is read once, no float work), in ms."""
    chunks, left = [], nbytes
    for p in sorted(model.parameters(), key=lambda p: -p.numel() * p.element_size()):
        if left <= 0:
            break
        flat = p.detach().reshape(-1).view(torch.uint8)
        take = min(left, flat.numel()) // 8 * 8
        if take:
            chunks.append(flat[:take].view(torch.int64))
            left -= take
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for chunk in chunks:
            chunk.sum()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@dataclass(frozen=True)
class Settings:
    """What the measuring process is given."""

    folder: str
    dtype: str
    task: str
    new_tokens: int
    floor_repeats: int
    threads: int  # 0: torch's default


def measure(settings: Settings, queue) -> None:
    """In a fresh process: load through the plugin, answer one lmms-eval request, time decode and its floor;
    puts a dict of measurements (or {"error": message}) on `queue`."""
    try:
        queue.put(_measure(settings))
    except Exception as err:  # the parent reports it and still cleans up
        queue.put({"error": f"{type(err).__name__}: {err}"})
        raise


def _measure(settings: Settings) -> dict:
    from knob_latency import decode_weight_params
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from lmms_adaptive.controllers.static import StaticController
    from lmms_adaptive.core.runtime import GenerationConfig
    from lmms_adaptive.integration.lmms_plugin import AdaptiveMolmoeLMM
    from lmms_adaptive.serving.records import read_records
    from lmms_adaptive.serving.request import Request, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder, new_tokens, floor_repeats = Path(settings.folder), settings.new_tokens, settings.floor_repeats
    os.environ["LMMS_ADAPTIVE_CACHE"] = str(folder.parent / "cache")  # the fingerprint's digest cache goes too
    baseline = proc_status("VmRSS")
    start = time.perf_counter()
    lm = AdaptiveMolmoeLMM(
        pretrained=str(folder), device="cpu", dtype=settings.dtype, warmup=False, log_dir=str(folder / "logs")
    )
    load_s = time.perf_counter() - start
    load_peak = proc_status("VmHWM")
    log.info("loaded in %.1fs, peak RSS %.2f GB", load_s, load_peak / 1e9)

    tasks = TaskManager(include_path=str(ROOT / "tasks"), include_defaults=False)
    simple_evaluate(
        model=lm, tasks=[settings.task], limit=1, task_manager=tasks, gen_kwargs=f"max_new_tokens={new_tokens}"
    )
    (record,) = [r for path in sorted((folder / "logs").glob("*.jsonl")) for r in read_records(path)]

    rt = lm.rt
    full = rt.knobs.full_plan()
    request = Request(
        QUESTION, (synthetic_image(DECODE_IMAGE, 0),), gen=GenerationConfig(new_tokens, stop_at_eos=False)
    )
    weight_bytes = decode_weight_params(rt.model.config, rt.schedule(full)) * rt.model.lm_head.weight.element_size()
    floors = [read_floor_ms(rt.model, weight_bytes, floor_repeats)]
    decode = serve(rt, StaticController(full, rt.knobs), request).execution.timings.decode_ms
    floors.append(read_floor_ms(rt.model, weight_bytes, floor_repeats))
    return {
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "baseline_rss_bytes": baseline,
        "load_peak_rss_bytes": load_peak,
        "peak_rss_bytes": proc_status("VmHWM"),
        "task": settings.task,
        "answer": record.answer,
        "request_total_ms": record.total_ms,
        "decode_ms_per_token": statistics.median(decode),
        "decode_compiled": rt.compiled,  # compile=auto: on for the full-size model when a compiler is present
        "decode_weight_bytes": weight_bytes,
        "floor_ms": min(floors),
    }


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/full_size.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("full", "mid", "tiny"), default="full", help="model shapes (default: full)")
    p.add_argument("--like", type=Path, help="copy config.json and tokenizer files from this checkpoint folder")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="bf16", help="weights on disk and in memory (default bf16)"
    )
    p.add_argument("--shard-mb", type=float, default=5 * 1024, help="shard size in MiB (default 5120, like the hub)")
    p.add_argument("--task", default="synth_vqa_test", help="local task (tasks/) of the one request")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens of the timed full-plan request (default 8)")
    p.add_argument("--floor-repeats", type=int, default=3, help="timed weight reads per floor measurement (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the measuring process (default: torch's)")
    p.add_argument("--tmp-dir", type=Path, help="where the temporary checkpoint folder goes (default: the system's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token comes from prefill; decode starts at the second)")
    if not (args.shard_mb > 0 and math.isfinite(args.shard_mb)) or args.floor_repeats < 1 or args.threads < 0:
        p.error("--shard-mb must be a positive number, --floor-repeats >= 1 and --threads >= 0")
    if args.like is not None and not (args.like / "config.json").is_file():
        p.error(f"--like {args.like}: no config.json there")
    return args


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="full_size_", dir=args.tmp_dir))
    try:
        folder = tmp / "checkpoint"
        config = write_side_files(folder, args.size, args.like)
        layout = checkpoint_layout(config)
        need = sum(math.prod(s) for s in layout.values()) * DTYPES[args.dtype][0].itemsize
        free_disk, free_ram = shutil.disk_usage(tmp).free, proc_kib("/proc/meminfo", "MemAvailable")
        if need * 1.02 > free_disk:
            raise SystemExit(f"{need / 1e9:.1f} GB of weights do not fit the {free_disk / 1e9:.1f} GB free in {tmp}")
        if free_ram is not None and need * RSS_TARGET > free_ram:
            raise SystemExit(
                f"loading {need / 1e9:.1f} GB of weights needs more than the {free_ram / 1e9:.1f} GB available"
            )
        start = time.perf_counter()
        weight_bytes, n_shards = write_random_checkpoint(
            folder, layout, args.dtype, int(args.shard_mb * 2**20), args.seed
        )
        write_s = time.perf_counter() - start
        log.info("wrote %.2f GB in %d shards to %s in %.1fs", weight_bytes / 1e9, n_shards, folder, write_s)
        spawn = multiprocessing.get_context("spawn")
        queue = spawn.Queue()
        child = spawn.Process(
            target=measure,
            args=(
                Settings(str(folder), args.dtype, args.task, args.new_tokens, args.floor_repeats, args.threads),
                queue,
            ),
        )
        child.start()
        child.join()
        got = (
            queue.get() if not queue.empty() else {"error": f"the measuring process died (exit code {child.exitcode})"}
        )
        if "error" in got:
            raise SystemExit(f"full_size: {got['error']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("removed %s", tmp)
    floor_ms = got.pop("floor_ms")
    result = Result(
        size=args.size, dtype=args.dtype, weight_bytes=weight_bytes, n_shards=n_shards, write_s=write_s, **got,
        x_weights=got["load_peak_rss_bytes"] / weight_bytes,
        x_weights_loading=(got["load_peak_rss_bytes"] - got["baseline_rss_bytes"]) / weight_bytes,
        new_tokens=args.new_tokens, floor_ms=floor_ms, floor_gbps=got["decode_weight_bytes"] / floor_ms / 1e6,
        x_floor=got["decode_ms_per_token"] / floor_ms, cleaned=not tmp.exists(),
    )  # fmt: skip
    print_result(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def print_result(r: Result) -> None:
    gb = 1e9
    print(
        f"{r.size} checkpoint, {r.dtype}: {r.weight_bytes / gb:.2f} GB in {r.n_shards} shards (written in {r.write_s:.1f} s)"
    )
    print(f"load through the plugin: {r.load_s:.1f} s; peak RSS {r.load_peak_rss_bytes / gb:.2f} GB = {r.x_weights:.3f}x "
          f"the weights (target <= {RSS_TARGET}), {r.x_weights_loading:.3f}x above the {r.baseline_rss_bytes / gb:.2f} GB "
          f"before loading; {r.peak_rss_bytes / gb:.2f} GB after the request")  # fmt: skip
    print(f"one {r.task} request through lmms-eval: {r.request_total_ms:.0f} ms, answer {r.answer[:40]!r}")
    print(f"decode, full plan, {r.threads} threads, compiled={r.decode_compiled}: {r.decode_ms_per_token:.1f} ms/token; floor {r.floor_ms:.1f} ms "
          f"({r.decode_weight_bytes / gb:.3f} GB at {r.floor_gbps:.1f} GB/s): {r.x_floor:.1f}x")  # fmt: skip
    print(f"temporary checkpoint removed: {r.cleaned}")


if __name__ == "__main__":
    main()
