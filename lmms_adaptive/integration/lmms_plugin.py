"""The lmms-eval model `adaptive_molmoe`: parse model_args, build each request, serve it, return the answers.

    lmms-eval --model adaptive_molmoe --model_args controller=static,tier=medium,top_k=6,budget=200 \\
        --include_path tasks --tasks textvqa_val_local,mme_local,pope_local --output_path out

Requests run one at a time through `serving.request.serve` (the budget is per request). Every request's
record is a line of `<log_dir>/adaptive_molmoe_<time>_rank<r>_pid<pid>.jsonl`; aggregates go to lmms-eval's
results (`throughput`) through `log_metrics` and to a `summary` JSON next to the records; answers carry token
counts (lmms-eval's `efficiency` section). `pretrained` is a folder or a hub id (`revision=` optional). Under
`accelerate launch --num_processes N` each rank serves its shard on its own device into its own record file,
and rank 0 writes the one summary over all ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from tqdm import tqdm

from lmms_adaptive import controllers
from lmms_adaptive.controllers.base import Controller
from lmms_adaptive.controllers.guard import ESTIMATOR_FILE, BudgetGuard, checkpoint_estimator
from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.checkpoint import resolve_checkpoint
from lmms_adaptive.core.plan import TIER_NAMES, Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig
from lmms_adaptive.integration.tasks import question_type
from lmms_adaptive.serving.ranks import Ranks
from lmms_adaptive.serving.records import RecordWriter, RequestRecord, summarize, summarize_by_task
from lmms_adaptive.serving.request import (
    DEFAULT_MAX_NEW_TOKENS,
    Request,
    Served,
    generation_config,
    is_number,
    serve,
    task_style,
)

log = logging.getLogger(__name__)

DEFAULT_LOG_DIR = Path("logs") / "adaptive_molmoe"
MODEL_ARGS = (
    "pretrained", "revision", "controller", "budget", "tier", "max_crops", "top_k", "blocks", "insert_pos", "renormalize",
    "style", "max_new_tokens", "slowdown", "device", "dtype", "log_dir", "warmup", "compile",
)  # fmt: skip


class ModelArgError(ValueError):
    """A bad `--model_args` value; the message names the argument and the valid choices."""


class RequestError(ValueError):
    """A request that cannot be served (an undecodable image, a prompt longer than the context, non-finite
    logits): the run stops with the task and doc id; the records written so far stay."""


class AdaptiveMolmoeLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str | None = None,
        controller: str = "static",
        budget: float | None = None,
        tier: str | None = None,
        max_crops: int | None = None,
        top_k: int | None = None,
        blocks: int | None = None,
        insert_pos: int = 1,
        renormalize: bool = False,
        style: str = "auto",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        slowdown: bool | str = "auto",
        device: str | None = None,
        dtype: str | None = None,
        log_dir: str | None = None,
        warmup: bool = True,
        compile: str = "auto",  # noqa: A002 (the model_arg's name)
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ModelArgError(
                f"adaptive_molmoe: unknown model_args {', '.join(sorted(unknown))}; valid: {', '.join(MODEL_ARGS)}"
            )
        if budget is not None and not (is_number(budget) and math.isfinite(budget) and budget > 0):
            raise ModelArgError(f"budget must be a finite positive number of milliseconds per request, got {budget!r}")
        renormalize, warmup = _bool("renormalize", renormalize), _bool("warmup", warmup)
        if str(batch_size) not in ("1", "auto"):
            log.warning(
                "adaptive_molmoe runs requests at batch size 1 (the budget is per request); batch_size=%s ignored",
                batch_size,
            )
        if isinstance(revision, bool | float):  # lmms-eval reads 1e5 as a number: the hash is lost
            raise ModelArgError(f"revision must be a branch, tag or commit hash, got {revision!r}")
        try:
            folder = resolve_checkpoint(
                None if pretrained is None else str(pretrained), None if revision is None else str(revision)
            )
        except (FileNotFoundError, ValueError) as err:
            raise ModelArgError(f"pretrained={pretrained!r}: {err}") from None

        accelerator = Accelerator()
        if accelerator.num_processes > 1:  # each rank on the device accelerate gives it (a GPU, or the CPU)
            device = str(accelerator.device)
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        if str(compile) not in ("auto", "on", "off"):
            raise ModelArgError(f"compile must be auto, on or off, got {compile!r}")
        self.ranks = Ranks(self._rank, self._world_size, device)
        self.rt = AdaptiveMolmoe.from_pretrained(folder, device=device, dtype=dtype, compile_decode=str(compile))
        self._device = self.rt.device
        self.budget = float(budget) if budget is not None else None
        self.style = style
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        static = {"tier": tier, "max_crops": max_crops, "top_k": top_k, "blocks": blocks}
        if controller == "static":
            self.controller: Controller = self._static_controller(
                tier, max_crops, top_k, blocks, insert_pos, renormalize
            )
        elif any(v is not None for v in static.values()):
            given = ", ".join(k for k, v in static.items() if v is not None)
            raise ModelArgError(
                f"{given} only apply to controller=static (controller={controller!r} chooses the knobs itself)"
            )
        else:
            self.controller = self._artifact_controller(controller)
        self.guard = self._budget_guard(slowdown)
        if self.controller.needs_budget and self.budget is None:
            raise ModelArgError(
                f"controller={controller!r} ({self.controller.kind}) decides per budget: give budget=<ms per request>"
            )
        self._log_dir = Path(log_dir) if log_dir else None
        self._writer: RecordWriter | None = None
        self._records: list[RequestRecord] = []
        if warmup:
            self.rt.warmup()

    @property
    def device(self) -> torch.device:
        return self._device

    # -- model_args -------------------------------------------------------------------------------

    def _static_controller(self, tier, max_crops, top_k, blocks, insert_pos, renormalize) -> StaticController:
        knobs = self.rt.knobs
        if tier is not None and max_crops is not None:
            raise ModelArgError("give either tier or max_crops, not both")
        if tier is not None and tier not in TIER_NAMES:
            raise ModelArgError(f"tier must be one of {', '.join(TIER_NAMES)} (max_crops {knobs.tiers}), got {tier!r}")
        crops = knobs.tier(tier) if tier is not None else _positive_int("max_crops", max_crops or knobs.max_crops)
        k = knobs.model_top_k if top_k is None else top_k
        if not isinstance(k, int) or not 1 <= k <= knobs.model_top_k:
            raise ModelArgError(
                f"top_k must be an integer in 1..{knobs.model_top_k} (knob options {list(knobs.top_k_options)}), got {k!r}"
            )
        if insert_pos not in knobs.insert_positions:
            raise ModelArgError(f"insert_pos must be one of {list(knobs.insert_positions)}, got {insert_pos!r}")
        options = knobs.block_options(insert_pos)
        n = knobs.n_layers if blocks is None else blocks
        if n not in options:
            raise ModelArgError(
                f"blocks must be in {options.start}..{options.stop - 1} for insert_pos {insert_pos}, got {n!r}"
            )
        return StaticController(Plan(crops, k, n, insert_pos, renormalize), knobs)

    def _budget_guard(self, slowdown: bool | str) -> BudgetGuard | None:
        """`slowdown=auto` (default): a budget guard when the checkpoint has a latency estimator for this model;
        `true`: one is required; `false`: none."""
        wanted = slowdown if slowdown == "auto" else _bool("slowdown", slowdown)
        estimator = None if wanted is False else checkpoint_estimator(self.rt.folder, self.rt.model_id)
        if wanted is True and estimator is None:
            raise ModelArgError(
                f"slowdown=true needs a latency estimator for this model in {self.rt.folder}/{ESTIMATOR_FILE} "
                "(python -m lmms_adaptive.tools.estimator fit PROFILE --out ...): fit one, or give slowdown=false"
            )
        return None if estimator is None else BudgetGuard(estimator)

    def _artifact_controller(self, name: str) -> Controller:
        """`controller=<kind>`: the artifact of that kind made for this model; else `controller=<path>`."""
        try:
            controller = controllers.load(name, self.rt)
        except FileNotFoundError as err:
            raise ModelArgError(f"{err}, or use controller=static") from None
        log.info("adaptive_molmoe: controller=%s (%s)", name, controller.describe())
        return controller

    # -- records ----------------------------------------------------------------------------------

    def _writer_for(self, request: Instance) -> RecordWriter:
        """Open the record file: `log_dir`, else next to the CLI's --output_path, else ./logs/adaptive_molmoe."""
        if self._writer is None:
            folder = Path(self._log_dir or _cli_output_path(request) or DEFAULT_LOG_DIR)
            self._writer = RecordWriter(
                unique_path(folder, f"adaptive_molmoe_{time.strftime('%Y%m%d_%H%M%S')}_rank{self.rank}")
            )
            log.info("adaptive_molmoe: request records -> %s", self._writer.path)
        return self._writer

    def _record(self, request: Instance, record: RequestRecord) -> None:
        if request.metadata and request.metadata.get("__padding_only__"):
            return  # lmms-eval's clone of a rank's last request, evening out the shards: answered, not recorded
        self._writer_for(request).write(record)
        self._records.append(record)

    def _report(self, records: list[RequestRecord]) -> None:
        """One process: the records of a generate_until / loglikelihood call into lmms-eval's results
        (`throughput`, printed as its Throughput Summary: latency mean / p95 in ms, budget violations in %) and a
        summary JSON beside them. Several: `clean` reports once over all ranks."""
        if self.ranks.world == 1 and records and self._writer is not None:
            self._write_report(records, [self._writer.path])

    def clean(self) -> None:
        """lmms-eval calls this on every rank once all requests are served (a response cache may have kept a
        rank from calling generate_until at all): under several processes rank 0 gathers every rank's
        records (padding clones are never recorded, see `_record`) and reports over all of them, beside its
        own records (or those of the first rank that has some)."""
        if self.ranks.world > 1:
            paths = self.ranks.gather(None if self._writer is None else str(self._writer.path))
            records = [r for part in self.ranks.gather(self._records) for r in part]
            written = [Path(p) for p in paths if p is not None]
            if self.ranks.main and records and written:
                self._write_report(records, written)
        super().clean()

    def _write_report(self, records: list[RequestRecord], record_files: list[Path]) -> None:
        stats = summarize(records)
        metrics = {k: v for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if metrics.pop("violation_rate", None) is not None:
            metrics["budget_violation_pct"] = 100.0 * stats["violation_rate"]
        metrics["total_requests"] = len(records)
        metrics.update(
            {
                f"frac_{knob}_{value}": count / len(records)
                for knob, hist in stats["knobs"].items()
                for value, count in hist.items()
            }
        )
        elapsed_s = sum(r.total_ms for r in records) / 1000.0
        tokens = sum(r.n_output_tokens for r in records)
        log_metrics(elapsed_s, tokens, tokens / elapsed_s if elapsed_s else 0.0, metrics)
        summary = {
            "overall": stats,
            "by_task": summarize_by_task(records),
            "controller": self.controller.describe(),
            "budget_ms": self.budget,
            "record_files": [p.name for p in record_files],
        }
        path = record_files[0].with_suffix(".summary.json")
        path.write_text(json.dumps(summary, indent=2, allow_nan=False))

    # -- requests ---------------------------------------------------------------------------------

    def _serve(self, request: Instance, gen: GenerationConfig, continuation: Any = None) -> Served:
        """Build the request from an lmms-eval instance and serve it (a loglikelihood one: score `continuation`)."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        images = [im for im in ((doc_to_visual(doc) if doc_to_visual is not None else None) or []) if im is not None]
        if callable(continuation):
            continuation = continuation(doc)
        if isinstance(continuation, list):
            continuation = continuation[0]
        try:
            served = serve(
                self.rt,
                self.controller,
                Request(
                    question=context, images=tuple(images), budget_ms=self.budget, gen=gen,
                    style=task_style(task, self.style), continuation=None if continuation is None else str(continuation),
                    task=task, doc_id=int(doc_id), split=split, question_type=question_type(doc),
                ),
                self.guard,
            )  # fmt: skip
        except (ValueError, FloatingPointError) as err:
            raise RequestError(f"adaptive_molmoe: {task} doc {doc_id} ({split}) cannot be served: {err}") from err
        self._record(request, served.record)
        return served

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """The answers, with lmms-eval's token counts: input = the prompt's tokens (image tokens included),
        output = the generated ones (they fill the samples' `token_counts` and the results' `efficiency`)."""
        records_before = len(self._records)
        answers = []
        for r in tqdm(requests, desc="adaptive_molmoe", disable=self.rank != 0):
            served = self._serve(r, generation_config(r.args[1], self.max_new_tokens))
            record = served.record
            counts = TokenCounts(input_tokens=record.n_prompt_tokens, output_tokens=record.n_output_tokens)
            answers.append(GenerationResult(text=served.text, token_counts=counts))
        self._report(self._records[records_before:])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        records_before = len(self._records)
        gen = GenerationConfig(max_new_tokens=1)  # nothing is generated: a controller sees one token to come
        scores = [
            self._serve(r, gen, continuation=r.args[1]).loglikelihood
            for r in tqdm(requests, desc="adaptive_molmoe loglikelihood", disable=self.rank != 0)
        ]
        self._report(self._records[records_before:])
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "adaptive_molmoe does not support multi-round generation (generate_until_multi_round)"
        )


def unique_path(folder: Path, stem: str) -> Path:
    """`folder/stem_pid<pid>.jsonl`, created empty and new (never shared with another run or process)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = folder / f"{stem}_pid{os.getpid()}{f'_{n}' if n else ''}.jsonl"
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            n += 1


def _bool(name: str, value: Any) -> bool:
    """true/false (lmms-eval passes them as booleans) or 1/0; anything else is an error, not truthiness."""
    if value in (True, False) and not isinstance(value, float):
        return bool(value)
    raise ModelArgError(f"{name} must be true or false (or 1 / 0), got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelArgError(f"{name} must be a positive integer, got {value!r}")
    return value


def _cli_output_path(request: Instance) -> Path | None:
    """lmms-eval passes --output_path to no model; under its CLI the task object (bound to doc_to_visual) holds the
    CLI args. Records then go to `<output_path>/adaptive_molmoe/`. None under `simple_evaluate` or when unset."""
    task = getattr(request.args[2], "__self__", None)
    output = getattr(getattr(task, "args", None), "output_path", None)
    return Path(output) / "adaptive_molmoe" if output else None
