"""Profiling: measure plans on lmms-eval tasks (one row per sample x plan), and rank blocks by importance.

    python -m lmms_adaptive.profile OUT_DIR --tasks synth_vqa_test,synth_pope_test --include-path tasks
    python -m lmms_adaptive.profile OUT_DIR --tasks textvqa_val --limit 200 --grid "max_crops=3,12;top_k=4,8"
    python -m lmms_adaptive.profile importance --tasks synth_vqa_val --include-path tasks --limit 24

A sweep runs every (sample, plan) at batch size 1 through the same generate path as evaluation (the
task's own prompt, generation kwargs and image), scores the answer with the task's own
`process_results`, and appends one `ProfileRow`. Rows go to `OUT_DIR/journal.jsonl` (flushed per
row: an interrupt loses at most the row in flight) and are compacted into `OUT_DIR/rows.parquet` at
the end of a sweep; re-running skips every row already there. Warm-up requests are not recorded.

Importance scores each block on calibration samples by 1 - cos(block input, block output) (mean
over prompt tokens, full plan); `--drop-score` adds the task-score drop when the block alone is
removed. The ranking is written as `block_importance.json` (with the model fingerprint) into the
checkpoint folder, where the runtime reads it to choose which blocks a plan drops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .lmms_plugin import DEFAULT_MAX_NEW_TOKENS, generation_config, task_style
from .plan import KnobSpace, Plan
from .records import ProfileRow, plan_key
from .runtime import IMPORTANCE_FILE, AdaptiveMolmoe, GenerationConfig, image_size

log = logging.getLogger(__name__)

ROWS_FILE = "rows.parquet"
JOURNAL_FILE = "journal.jsonl"


# ----------------------------------------------------------------------------------------------------
# Storage: append-only journal + compacted Parquet
# ----------------------------------------------------------------------------------------------------


def read_profile(folder: str | Path) -> list[ProfileRow]:
    """Every row of a profile folder (Parquet plus journal rows not yet compacted), without duplicates."""
    folder = Path(folder)
    if not (folder / ROWS_FILE).is_file() and not (folder / JOURNAL_FILE).is_file():
        raise FileNotFoundError(f"no profile rows in {folder} (expected {ROWS_FILE} or {JOURNAL_FILE})")
    rows: dict[tuple[str, int, str], ProfileRow] = {}
    for row in _read_parquet(folder / ROWS_FILE) + _read_journal(folder / JOURNAL_FILE):
        rows.setdefault(row.key, row)
    return list(rows.values())


def _read_parquet(path: Path) -> list[ProfileRow]:
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    return [ProfileRow(**r) for r in pq.read_table(path).to_pylist()]


def _read_journal(path: Path) -> list[ProfileRow]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(ProfileRow(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # the partial last line of an interrupted write
    return rows


class ProfileStore:
    """A profile folder being written: which rows exist, appending one, compacting to Parquet."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        existing = read_profile(folder) if self._has_rows() else []
        self.done = {r.key for r in existing}
        self._journal = (folder / JOURNAL_FILE).open("a", encoding="utf-8")

    def _has_rows(self) -> bool:
        return (self.folder / ROWS_FILE).is_file() or (self.folder / JOURNAL_FILE).is_file()

    def append(self, row: ProfileRow) -> None:
        self._journal.write(json.dumps(asdict(row), separators=(",", ":")) + "\n")
        self._journal.flush()
        self.done.add(row.key)

    def compact(self) -> Path:
        """Merge the journal into rows.parquet (atomic replace), then empty the journal."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._journal.close()
        rows = read_profile(self.folder)
        table = pa.Table.from_pylist([asdict(r) for r in rows], schema=_arrow_schema())
        target = self.folder / ROWS_FILE
        tmp = target.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, target)
        (self.folder / JOURNAL_FILE).unlink(missing_ok=True)
        self._journal = (self.folder / JOURNAL_FILE).open("a", encoding="utf-8")
        return target

    def close(self) -> None:
        self._journal.close()


def _arrow_schema():
    import pyarrow as pa

    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(), "list[float]": pa.list_(pa.float64())}
    return pa.schema([(f.name, types[f.type]) for f in fields(ProfileRow)])


# ----------------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------------

GRID_KEYS = ("max_crops", "top_k", "n_blocks", "insert_pos")


def parse_grid(spec: str | None) -> dict[str, tuple[int, ...]]:
    """"max_crops=3,12;top_k=4,8" -> {"max_crops": (3, 12), "top_k": (4, 8)}; keys not given are unrestricted."""
    grid: dict[str, tuple[int, ...]] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise ValueError(f"--grid: {part!r} must look like KEY=V1,V2 with KEY one of {', '.join(GRID_KEYS)}")
        try:
            grid[key] = tuple(int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--grid: values of {key} must be integers, got {values!r}") from None
    return grid


def grid_plans(knobs: KnobSpace, grid: dict[str, tuple[int, ...]] | None = None) -> list[Plan]:
    """Every valid plan of the knob space (tiers x top-k x insertion positions x the block counts each allows),
    narrowed by `grid`. Plans that differ only in top-k where no block runs after p are not repeated."""
    grid = grid or {}
    for key, values in grid.items():
        allowed = {"max_crops": knobs.tiers, "top_k": knobs.top_k_options, "insert_pos": knobs.insert_positions}.get(key)
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise ValueError(f"--grid: {key} values {bad} are not in the model's knob space {list(allowed)}")
    plans = []
    for crops in grid.get("max_crops", knobs.tiers):
        for p in grid.get("insert_pos", knobs.insert_positions):
            for blocks in knobs.block_options(p):
                if "n_blocks" in grid and blocks not in grid["n_blocks"]:
                    continue
                ks = grid.get("top_k", knobs.top_k_options) if p < knobs.n_layers else (knobs.model_top_k,)
                plans.extend(Plan(crops, k, blocks, p) for k in ks)
    if not plans:
        raise ValueError(f"--grid {grid} leaves no valid plan in the knob space")
    return plans


# ----------------------------------------------------------------------------------------------------
# Task samples, through lmms-eval's own task objects
# ----------------------------------------------------------------------------------------------------


@dataclass
class TaskSample:
    """One generate_until request of an lmms-eval task, as the evaluator would send it."""

    task: str
    doc_id: int
    split: str
    context: str
    gen_kwargs: dict[str, Any]
    images: list[Any]
    doc: Any
    task_obj: Any

    def score(self, answer: str) -> float:
        return primary_score(self.task_obj, self.doc, answer)


def primary_score(task_obj: Any, doc: Any, answer: str) -> float:
    """The task's own `process_results` for one answer, reduced to its first metric (in metric_list order)
    that carries a number: the value itself, or the `score` of a per-sample dict (POPE, MME)."""
    result = task_obj.process_results(doc, [answer])
    names = [m["metric"] for m in task_obj.config.metric_list] + list(result)
    for name in names:
        value = result.get(name)
        if isinstance(value, dict):
            value = value.get("score")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(f"task {task_obj.config.task}: process_results gave no numeric score ({sorted(result)})")


def load_samples(tasks: Sequence[str], include_path: Sequence[str], limit: int | None, seed: int) -> list[TaskSample]:
    """generate_until requests of the tasks; with `limit`, a seeded random subset of each task's docs."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=list(include_path), include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # hub tasks: index the built-in ones too
        manager = TaskManager(include_path=list(include_path) or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s) {unknown}; local tasks need --include-path tasks")
    samples: list[TaskSample] = []
    leaves = sorted(_leaf_tasks(get_task_dict(list(tasks), manager)), key=lambda nt: (_position(nt[0], tasks), nt[0]))
    for name, task in leaves:
        if task.OUTPUT_TYPE != "generate_until":
            raise ValueError(f"task {name}: output type {task.OUTPUT_TYPE!r}; profiling measures generate_until tasks")
        task.build_all_requests(limit=None, rank=0, world_size=1)
        instances = sorted(task.instances, key=lambda inst: inst.args[3])
        if limit is not None and limit < len(instances):
            instances = sorted(random.Random(f"{seed}/{name}").sample(instances, limit), key=lambda inst: inst.args[3])
        docs = task.eval_docs
        for inst in instances:
            context, gen_kwargs, doc_to_visual, doc_id, task_name, split = inst.args
            doc = docs[doc_id]
            images = [im for im in (doc_to_visual(doc) or []) if im is not None]
            samples.append(TaskSample(task_name, int(doc_id), split, context, dict(gen_kwargs), images, doc, task))
    return samples


def _position(name: str, requested: Sequence[str]) -> int:
    """Tasks asked for by name come in the order asked; members of groups / tags after them."""
    return requested.index(name) if name in requested else len(requested)


def _leaf_tasks(task_dict: dict) -> Iterator[tuple[str, Any]]:
    for name, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield str(getattr(value.config, "task", name)), value


# ----------------------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------------------


def measure(
    rt: AdaptiveMolmoe, sample: TaskSample, plan: Plan, gen: GenerationConfig, style: str, repeats: int = 1
) -> ProfileRow:
    """Run one (sample, plan) through the evaluation generate path `repeats` times and score it.

    Greedy decoding gives the same answer every time; each latency is the median over the repeats
    (per stage, and per decode step), so a burst of load from elsewhere on the machine moves no row."""
    outs = [rt.generate(sample.context, sample.images, plan, gen, style=task_style(sample.task, style)) for _ in range(repeats)]
    out, t = outs[0], outs[0].timings
    if any(o.token_ids != out.token_ids for o in outs[1:]):
        raise RuntimeError(f"{sample.task} doc {sample.doc_id}: repeats of {plan} generated different answers (sampling?)")

    def median(stage: str) -> float:
        return float(np.median([getattr(o.timings, stage) for o in outs]))

    decode = [float(x) for x in np.median([o.timings.decode_ms for o in outs], axis=0)] if t.decode_ms else []
    return ProfileRow(
        task=sample.task, doc_id=sample.doc_id, split=sample.split,
        max_crops=plan.max_crops, top_k=plan.top_k, n_blocks=plan.n_blocks, insert_pos=plan.insert_pos,
        renormalize=plan.renormalize, n_crops=out.n_crops, n_image_tokens=out.n_image_tokens,
        n_text_tokens=out.n_prompt_tokens - out.n_image_tokens, n_prompt_tokens=out.n_prompt_tokens,
        n_output_tokens=len(out.token_ids), max_new_tokens=gen.max_new_tokens,
        preprocess_ms=median("preprocess_ms"), vision_ms=median("vision_ms"), prefill_ms=median("prefill_ms"),
        decode_ms=decode, total_ms=median("total_ms"), score=sample.score(out.text), answer=out.text,
        stop_reason=out.stop_reason, device=device_name(rt.device), model_fingerprint=rt.model_id, repeats=repeats,
        image_pixels=sum(h * w for h, w in map(image_size, sample.images)),
    )  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def sweep(
    rt: AdaptiveMolmoe,
    samples: Sequence[TaskSample],
    plans: Sequence[Plan],
    out: Path,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    style: str = "auto",
    repeats: int = 1,
) -> Path:
    """Measure every (sample, plan) not yet in `out` (`repeats` times each, see `measure`); returns the
    compacted Parquet file."""
    store = ProfileStore(out)
    todo = [(s, p) for s in samples for p in plans if (s.task, s.doc_id, plan_key(p.to_dict())) not in store.done]
    log.info("profile: %d rows to measure (%d already in %s)", len(todo), len(samples) * len(plans) - len(todo), out)
    if todo:
        rt.warmup([rt.knobs.full_plan(c) for c in sorted({p.max_crops for _, p in todo})])
    try:
        for sample, plan in tqdm(todo, desc="profile", unit="row"):
            gen = generation_config(sample.gen_kwargs, max_new_tokens)
            store.append(measure(rt, sample, plan, gen, style, repeats))
    finally:
        path = store.compact()
        store.close()
    return path


# ----------------------------------------------------------------------------------------------------
# Block importance
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockImportance:
    """Per-block importance of one model; `drop_order` lists blocks least important first."""

    model_fingerprint: str
    cosine: list[float]  # mean 1 - cos(input, output) of each block
    drop_score: list[float] | None  # mean task-score drop when only that block is removed
    drop_order: list[int]
    n_samples: int
    tasks: list[str]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> BlockImportance:
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: not a block importance file ({err})") from err


def ranking(cosine: Sequence[float], drop_score: Sequence[float] | None) -> list[int]:
    """Least important first: by score drop when measured (ties by cosine), else by cosine; ties by depth (deeper first)."""
    n = len(cosine)
    key = (lambda i: (drop_score[i], cosine[i], -i)) if drop_score is not None else (lambda i: (cosine[i], -i))
    return sorted(range(n), key=key)


@torch.inference_mode()
def block_cosine(rt: AdaptiveMolmoe, samples: Sequence[TaskSample], style: str = "auto") -> list[float]:
    """Mean over samples of each block's mean 1 - cos(input, output) over the prompt tokens, full plan."""
    knobs, model = rt.knobs, rt.model
    schedule = rt.schedule(knobs.full_plan())
    totals = np.zeros(knobs.n_layers)

    def observe(block: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
        totals[block] += float((1 - cos).mean())

    for sample in tqdm(samples, desc="importance (cosine)", unit="sample"):
        request = rt.processor(sample.context, sample.images, max_crops=knobs.max_crops, style=task_style(sample.task, style))
        ids = torch.as_tensor(request.input_ids, device=rt.device)[None]
        features, idx = rt.vision(request)
        positions = torch.arange(ids.shape[1], device=rt.device)[None]
        model.decode_layers(model.embed(ids, features, idx), positions, schedule, on_block=observe)
    return list(totals / max(1, len(samples)))


def block_drop_scores(rt: AdaptiveMolmoe, samples: Sequence[TaskSample], max_new_tokens: int, style: str = "auto") -> list[float]:
    """Mean task-score drop when each block alone is removed (full plan otherwise)."""
    from .model import LayerSchedule

    knobs = rt.knobs
    full = rt.schedule(knobs.full_plan())

    def mean_score(schedule: LayerSchedule) -> float:
        scores = []
        for sample in samples:
            gen = generation_config(sample.gen_kwargs, max_new_tokens)
            request = rt.processor(sample.context, sample.images, max_crops=knobs.max_crops, style=task_style(sample.task, style))
            scores.append(sample.score(rt.run(request, knobs.full_plan(), gen, schedule=schedule).text))
        return float(np.mean(scores))

    base = mean_score(full)
    drops = []
    for block in tqdm(range(knobs.n_layers), desc="importance (drop one block)", unit="block"):
        without = LayerSchedule(tuple(layer for layer in full.layers if layer[0] != block), full.renormalize)
        drops.append(base - mean_score(without))
    return drops


def importance(rt: AdaptiveMolmoe, samples: Sequence[TaskSample], with_drop_score: bool, max_new_tokens: int) -> BlockImportance:
    cosine = block_cosine(rt, samples)
    drops = block_drop_scores(rt, samples, max_new_tokens) if with_drop_score else None
    return BlockImportance(
        model_fingerprint=rt.model_id,
        cosine=[round(c, 6) for c in cosine],
        drop_score=None if drops is None else [round(d, 6) for d in drops],
        drop_order=ranking(cosine, drops),
        n_samples=len(samples),
        tasks=sorted({s.task for s in samples}),
    )


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names (hub or --include-path ones)")
    parser.add_argument("--include-path", action="append", default=[], help="folder of task YAMLs (e.g. tasks); repeatable")
    parser.add_argument("--limit", type=int, default=None, help="samples per task, drawn at random with --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample draw (default 0)")
    parser.add_argument("--pretrained", default=None, help="checkpoint folder (default: the built-in tiny model)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16 / fp32 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"when the task sets none (default {DEFAULT_MAX_NEW_TOKENS})")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["importance"]:
        parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.profile importance", description="Rank decoder blocks by importance on calibration samples.")
        _common(parser)
        parser.add_argument("--drop-score", action="store_true", help="also measure the task-score drop of removing each block (slower)")
        parser.add_argument("--out", type=Path, default=None, help=f"output file (default: <checkpoint>/{IMPORTANCE_FILE})")
        args = parser.parse_args(argv[1:])
    else:
        parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.profile", description=__doc__.split("\n\n")[0],
                                         epilog="Subcommand: `importance` (see `python -m lmms_adaptive.profile importance --help`).")  # fmt: skip
        parser.add_argument("out", type=Path, help="profile folder (rows.parquet); re-running resumes")
        _common(parser)
        parser.add_argument("--grid", default=None, help='narrow the knob grid, e.g. "max_crops=3,12;top_k=4,8;n_blocks=12,16;insert_pos=1"')
        parser.add_argument("--repeats", type=int, default=1,
                            help="runs per row; latencies are the medians (use 3+ on a machine shared with other work)")  # fmt: skip
        args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    rt = AdaptiveMolmoe.from_pretrained(args.pretrained, device=args.device, dtype=args.dtype)
    samples = load_samples(tasks, args.include_path, args.limit, args.seed)
    if argv[:1] == ["importance"]:
        result = importance(rt, samples, args.drop_score, args.max_new_tokens)
        out = args.out or rt.folder / IMPORTANCE_FILE
        result.save(out)
        print(f"drop order (least important first): {result.drop_order}\nwritten to {out}")
        return
    plans = grid_plans(rt.knobs, parse_grid(args.grid))
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    print(sweep(rt, samples, plans, args.out, args.max_new_tokens, repeats=args.repeats))


if __name__ == "__main__":
    main()
