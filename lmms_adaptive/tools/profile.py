"""Profiling: measure plans on lmms-eval tasks, one request record per (sample, plan).

    python -m lmms_adaptive.tools.profile OUT_DIR --tasks synth_vqa_test,synth_pope_test --include-path tasks
    python -m lmms_adaptive.tools.profile OUT_DIR --tasks textvqa_val --limit 200 --grid "max_crops=3,12;top_k=4,8"

A sweep serves every (sample, plan) at batch size 1 through the one request path (`serving.request.serve`,
under a static controller; the task's own prompt, generation kwargs and image), scores the answer with the
task's own `process_results`, and appends the request's record with its `score`. Records go to
`OUT_DIR/journal.jsonl` (flushed per row: an interrupt loses at most the row in flight) and are compacted
into `OUT_DIR/rows.parquet` at the end of a sweep; re-running skips every row already there. Warm-up
requests are not recorded. `OUT_DIR/profile.json` names the model (fingerprint and knob space) the rows
belong to; a sweep of another model into the same folder is refused.

Under `accelerate launch --num_processes N` the (sample, plan) grid is dealt out over the ranks (`Ranks.shard`:
every N-th row), each rank measures its rows at batch size 1 on its own device into its own
`journal.rank<r>.jsonl`, and rank 0 compacts all journals into `rows.parquet` once every rank is done. Rows
already in the folder are skipped whatever world size wrote them, so an interrupted run resumes (each rank
its own rows) with the same or another number of processes. Rank 0 holds the folder lock for the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from lmms_adaptive.controllers.base import knob_space_from_json, knob_space_json
from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.plan import KNOBS, KnobSpace, Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe
from lmms_adaptive.integration.tasks import TaskSample, load_samples
from lmms_adaptive.serving.ranks import SINGLE, Ranks, init
from lmms_adaptive.serving.records import RecordWriter, RequestRecord, read_records
from lmms_adaptive.serving.request import DEFAULT_MAX_NEW_TOKENS, serve
from lmms_adaptive.tools.cli import HelpFormatter, progress, setup_logging, took
from lmms_adaptive.tools.runlog import exclusive

log = logging.getLogger(__name__)

ROWS_FILE = "rows.parquet"
JOURNAL_FILE = "journal.jsonl"
META_FILE = "profile.json"
MEDIAN_FIELDS = ("facts_ms", "controller_ms", "preprocess_ms", "vision_ms", "prefill_ms", "total_ms")


# ----------------------------------------------------------------------------------------------------
# Storage: append-only journal of records + compacted Parquet
# ----------------------------------------------------------------------------------------------------


def row_key(row: RequestRecord) -> tuple[str, int, str]:
    """(task, doc_id, plan key): what makes a row unique in a sweep."""
    return row.task, row.doc_id, row.plan.key


def journal_name(ranks: Ranks) -> str:
    """`journal.jsonl` for a single process, `journal.rank<r>.jsonl` for rank r of several."""
    return JOURNAL_FILE if ranks.world == 1 else f"journal.rank{ranks.rank}.jsonl"


def journals(folder: Path) -> list[Path]:
    """The journals in a profile folder: the single process's and any rank's."""
    return sorted(folder.glob("journal*.jsonl"))


def read_profile(folder: str | Path) -> list[RequestRecord]:
    """Every row of a profile folder (Parquet plus journal rows not yet compacted), without duplicates."""
    folder = Path(folder)
    if not (folder / ROWS_FILE).is_file() and not journals(folder):
        raise FileNotFoundError(f"no profile rows in {folder} (expected {ROWS_FILE} or {JOURNAL_FILE})")
    journal = [row for path in journals(folder) for row in read_records(path)]
    rows: dict[tuple[str, int, str], RequestRecord] = {}
    for row in _read_parquet(folder / ROWS_FILE) + journal:
        rows.setdefault(row_key(row), row)
    return list(rows.values())


def count_rows(path: Path) -> int:
    """The rows of a compacted rows.parquet, read from its footer."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _arrow_schema():
    """RequestRecord's fields as Parquet columns: the plan a struct, the controller description JSON text."""
    import pyarrow as pa

    plan = pa.struct([(f.name, pa.bool_() if f.type == "bool" else pa.int64()) for f in fields(Plan)])
    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
             "float | None": pa.float64(), "bool | None": pa.bool_(), "str | None": pa.string(),
             "list[float]": pa.list_(pa.float64()),
             "Plan": plan, "dict[str, Any]": pa.string()}  # fmt: skip
    return pa.schema([(f.name, types[f.type]) for f in fields(RequestRecord)])


def _read_parquet(path: Path) -> list[RequestRecord]:
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    return [
        RequestRecord.from_dict({**row, "controller": json.loads(row["controller"])})
        for row in pq.read_table(path).to_pylist()
    ]


class ProfileStore:
    """A profile folder being written for one model: which rows exist, appending one (to this rank's
    journal), compacting all journals to Parquet."""

    def __init__(self, folder: Path, model_fingerprint: str, knobs: KnobSpace, journal: str = JOURNAL_FILE) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model_fingerprint": model_fingerprint, "knob_space": knob_space_json(knobs)}
        if (folder / META_FILE).is_file():
            saved = json.loads((folder / META_FILE).read_text())
            if saved != meta:
                raise ValueError(
                    f"{folder} holds a profile of model {saved.get('model_fingerprint')}, not of the loaded model "
                    f"{model_fingerprint}: profile it into another folder"
                )
        else:
            (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        existing = read_profile(folder) if self._has_rows() else []
        self.done = {row_key(r) for r in existing}
        self._journal = RecordWriter(folder / journal)

    def _has_rows(self) -> bool:
        return (self.folder / ROWS_FILE).is_file() or bool(journals(self.folder))

    def append(self, row: RequestRecord) -> None:
        self._journal.write(row)
        self.done.add(row_key(row))

    def compact(self) -> Path:
        """Merge every journal into rows.parquet (atomic replace), then remove them (no other rank may be
        writing one). The store is closed afterwards: compacting ends a sweep."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._journal.close()
        rows = [{**r.to_dict(), "controller": json.dumps(r.controller)} for r in read_profile(self.folder)]
        target = self.folder / ROWS_FILE
        tmp = target.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema()), tmp)
        os.replace(tmp, target)
        for path in journals(self.folder):
            path.unlink()
        return target

    def close(self) -> None:
        self._journal.close()


def profile_knobs(folder: str | Path) -> KnobSpace:
    """The knob space of the model a profile folder was measured on."""
    path = Path(folder) / META_FILE
    try:
        return knob_space_from_json(json.loads(path.read_text())["knob_space"])
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: not a folder written by `python -m lmms_adaptive.tools.profile`"
        ) from None
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: expected JSON with the profiled model's knob_space ({err})") from err


# ----------------------------------------------------------------------------------------------------
# Grid and sweep
# ----------------------------------------------------------------------------------------------------


def parse_grid(spec: str | None) -> dict[str, tuple[int, ...]]:
    """ "max_crops=3,12;top_k=4,8" -> {"max_crops": (3, 12), "top_k": (4, 8)}; knobs not given are unrestricted."""
    grid: dict[str, tuple[int, ...]] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in KNOBS:
            raise ValueError(f"--grid: {part!r} must look like KEY=V1,V2 with KEY one of {', '.join(KNOBS)}")
        try:
            grid[key] = tuple(int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--grid: values of {key} must be integers, got {values!r}") from None
    return grid


def measure(
    rt: AdaptiveMolmoe, sample: TaskSample, plan: Plan, max_new_tokens: int, style: str, repeats: int = 1
) -> RequestRecord:
    """Serve one (sample, plan) `repeats` times and score it. Greedy decoding gives the same answer every
    time; each latency is the median over the repeats (per stage, and per decode step), so a burst of load
    from elsewhere on the machine moves no row."""
    controller, request = StaticController(plan, rt.knobs), sample.request(None, max_new_tokens, style)
    records = [serve(rt, controller, request).record for _ in range(repeats)]
    first = records[0]
    if any(r.answer != first.answer or r.n_output_tokens != first.n_output_tokens for r in records[1:]):
        raise RuntimeError(f"{sample.task} doc {sample.doc_id}: repeats of {plan} generated different answers")
    medians = {name: float(np.median([getattr(r, name) for r in records])) for name in MEDIAN_FIELDS}
    decode = [float(x) for x in np.median([r.decode_ms for r in records], axis=0)] if first.decode_ms else []
    return replace(first, **medians, decode_ms=decode, score=sample.score(first.answer), repeats=repeats)


def sweep(
    rt: AdaptiveMolmoe,
    samples: Sequence[TaskSample],
    plans: Sequence[Plan],
    out: Path,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    style: str = "auto",
    repeats: int = 1,
    ranks: Ranks = SINGLE,
) -> Path:
    """Measure every (sample, plan) not yet in `out` (`repeats` times each, see `measure`); returns the
    compacted Parquet file. One run at a time per folder: a second one is refused (`runlog.FolderInUse`).
    With several `ranks` (every rank calls this with the same samples and plans) each measures its shard
    of the grid, and rank 0 compacts once all are done; an interrupted rank leaves its journal to resume."""
    with exclusive(out, "profile") if ranks.main else nullcontext():
        if ranks.main:  # checks or writes profile.json before any other rank reads it
            store = ProfileStore(out, rt.model_id, rt.knobs, journal_name(ranks))
        ranks.barrier()
        if not ranks.main:
            store = ProfileStore(out, rt.model_id, rt.knobs, journal_name(ranks))
        ranks.barrier()  # every rank has read the rows done before any writes a new one
        return _sweep(
            rt, ranks.shard([(s, p) for s in samples for p in plans]), store, ranks, max_new_tokens, style, repeats
        )


def _sweep(
    rt: AdaptiveMolmoe,
    grid: Sequence[tuple[TaskSample, Plan]],
    store: ProfileStore,
    ranks: Ranks,
    max_new_tokens: int,
    style: str,
    repeats: int,
) -> Path:
    out = store.folder
    todo = [(s, p) for s, p in grid if (s.task, s.doc_id, p.key) not in store.done]
    log.info("profile: %d rows to measure (%d already in %s)", len(todo), len(grid) - len(todo), out)
    if todo:
        rt.warmup([rt.knobs.full_plan(c) for c in sorted({p.max_crops for _, p in todo})])
    try:
        for sample, plan in progress(todo, desc="profile", unit="row", disable=not ranks.main):
            store.append(measure(rt, sample, plan, max_new_tokens, style, repeats))
    finally:
        store.close()
        if ranks.world == 1:  # an interrupted sweep too: its rows go to Parquet
            store.compact()
    if ranks.world > 1:  # the other ranks may still be writing: compact once all are done
        ranks.barrier()
        if ranks.main:
            store.compact()
    return out / ROWS_FILE


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model and the task samples (shared with `tools.importance`)."""
    parser.add_argument(
        "--tasks", required=True, help="comma-separated lmms-eval task names, hub or --include-path ones (required)"
    )
    parser.add_argument("--include-path", action="append", default=[],
                        help="folder of task YAMLs, e.g. tasks; repeatable (default: lmms-eval's tasks only)")  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=None, help="samples per task, drawn at random with --seed (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample draw")
    parser.add_argument(
        "--pretrained", default=None, help="checkpoint folder or hub id (default: the built-in tiny model)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16 / fp32 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="the generation limit when the task sets none")  # fmt: skip


def load_model_and_samples(args: argparse.Namespace) -> tuple[AdaptiveMolmoe, list[TaskSample]]:
    rt = AdaptiveMolmoe.from_pretrained(args.pretrained, device=args.device, dtype=args.dtype)
    return rt, load_samples([t for t in args.tasks.split(",") if t], args.include_path, args.limit, args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.profile", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("out", type=Path, help="profile folder (rows.parquet); re-running resumes")
    add_sample_args(parser)
    parser.add_argument("--grid", default=None, help='narrow the knob grid, e.g. "max_crops=3,12;top_k=4,8;n_blocks=12,16;'
                        'insert_pos=1" (default: every plan of the knob space)')  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per row; latencies are the medians, use 3+ on a machine shared with other work")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    ranks = init(args.device)
    args.device = ranks.device  # under a launcher: this rank's device
    rt, samples = load_model_and_samples(args)
    try:
        plans = rt.knobs.plans(parse_grid(args.grid))
    except ValueError as err:
        parser.error(f"--grid: {err}")
    path = sweep(rt, samples, plans, args.out, args.max_new_tokens, repeats=args.repeats, ranks=ranks)
    if ranks.main:
        log.info("profile: %d rows (%d samples x %d plans) in %s; took %s", count_rows(path), len(samples),
                 len(plans), path, took(started))  # fmt: skip
        print(path)


if __name__ == "__main__":
    main()
