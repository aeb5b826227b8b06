"""The lmms-eval model `adaptive_molmoe`: parse model_args, plan each request with a controller, run, record.

    lmms-eval --model adaptive_molmoe --model_args controller=static,tier=medium,top_k=6,budget=200 \\
        --include_path tasks --tasks textvqa_val_local,mme_local,pope_local --output_path out

Requests run one at a time (the budget is per request). Every request gets a `RequestRecord` line in
`<log_dir>/adaptive_molmoe_<time>_rank<r>.jsonl`; aggregates go to lmms-eval's results (`throughput`)
through `log_metrics` and to a `summary` JSON next to the records.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from tqdm import tqdm

from .controllers import (
    BUILTIN_CONTROLLERS,
    REPO_ARTIFACTS,
    Controller,
    RequestFacts,
    StaticController,
    find_artifact,
    load_controller,
    read_artifact,
    stage1_decision,
)
from .plan import TIER_NAMES, DeferredPlan, Plan
from .records import RecordWriter, RequestRecord, summarize, summarize_by_task
from .runtime import AdaptiveMolmoe, Generation, GenerationConfig

log = logging.getLogger(__name__)

DEFAULT_LOG_DIR = Path("logs") / "adaptive_molmoe"
DEFAULT_MAX_NEW_TOKENS = 64

# Molmo's eval-style prefixes by task-name prefix; yes/no tasks use the short-answer VQA style.
TASK_STYLES = (
    ("textvqa", "text_vqa"), ("vqav2", "vqa2"), ("docvqa", "doc_qa"), ("chartqa", "chart_qa"),
    ("ai2d", "ai2_diagram"), ("scienceqa", "science_qa"), ("mme", "vqa2"), ("pope", "vqa2"),
)  # fmt: skip


def task_style(task: str, style: str) -> str | None:
    """The prompt prefix for a request: `style=auto` picks by task name, `none` disables, else literal."""
    if style == "none":
        return None
    if style != "auto":
        return style
    return next((prefix for name, prefix in TASK_STYLES if task.startswith(name)), None)


class ModelArgError(ValueError):
    """A bad `--model_args` value; the message names the argument and the valid choices."""


class AdaptiveMolmoeLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
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
        device: str | None = None,
        dtype: str | None = None,
        log_dir: str | None = None,
        warmup: bool = True,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ModelArgError(
                f"adaptive_molmoe: unknown model_args {', '.join(sorted(unknown))}; valid: pretrained, controller, budget, "
                "tier, max_crops, top_k, blocks, insert_pos, renormalize, style, max_new_tokens, device, dtype, log_dir, warmup"
            )
        if budget is not None and (not isinstance(budget, int | float) or isinstance(budget, bool) or budget <= 0):
            raise ModelArgError(f"budget must be a positive number of milliseconds per request, got {budget!r}")
        if str(batch_size) not in ("1", "auto"):
            log.warning("adaptive_molmoe runs requests at batch size 1 (the budget is per request); batch_size=%s ignored", batch_size)
        if pretrained is not None and not Path(str(pretrained)).is_dir():
            raise ModelArgError(f"pretrained={pretrained!r}: checkpoint folder not found")

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}"
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        self.accelerator = accelerator
        self.rt = AdaptiveMolmoe.from_pretrained(pretrained, device=device, dtype=dtype)
        self._device = self.rt.device
        self.budget = float(budget) if budget is not None else None
        self.style = style
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.controller = self._make_controller(controller, tier, max_crops, top_k, blocks, insert_pos, renormalize)
        self._log_dir = Path(log_dir) if log_dir else None
        self._writer: RecordWriter | None = None
        self._records: list[dict[str, Any]] = []
        if warmup:
            self.rt.warmup()

    @property
    def device(self) -> torch.device:
        return self._device

    # -- model_args -------------------------------------------------------------------------------

    def _make_controller(self, name, tier, max_crops, top_k, blocks, insert_pos, renormalize) -> Controller:
        knobs = self.rt.knobs
        static_args = {"tier": tier, "max_crops": max_crops, "top_k": top_k, "blocks": blocks}
        if name == "static":
            if tier is not None and max_crops is not None:
                raise ModelArgError("give either tier or max_crops, not both")
            if tier is not None and tier not in TIER_NAMES:
                raise ModelArgError(f"tier must be one of {', '.join(TIER_NAMES)} (max_crops {knobs.tiers}), got {tier!r}")
            crops = knobs.tier(tier) if tier is not None else _positive_int("max_crops", max_crops or knobs.max_crops)
            k = knobs.model_top_k if top_k is None else top_k
            if not isinstance(k, int) or not 1 <= k <= knobs.model_top_k:
                raise ModelArgError(f"top_k must be an integer in 1..{knobs.model_top_k} (knob options {list(knobs.top_k_options)}), got {k!r}")
            if insert_pos not in knobs.insert_positions:
                raise ModelArgError(f"insert_pos must be one of {list(knobs.insert_positions)}, got {insert_pos!r}")
            options = knobs.block_options(insert_pos)
            n = knobs.n_layers if blocks is None else blocks
            if n not in options:
                raise ModelArgError(f"blocks must be in {options.start}..{options.stop - 1} for insert_pos {insert_pos}, got {n!r}")
            return StaticController(Plan(crops, k, n, insert_pos, bool(renormalize)), knobs)
        if any(v is not None for v in static_args.values()):
            given = ", ".join(k for k, v in static_args.items() if v is not None)
            raise ModelArgError(f"{given} only apply to controller=static (controller={name!r} chooses the knobs itself)")
        if name in BUILTIN_CONTROLLERS:
            folders = [p for p in (self.rt.folder and self.rt.folder / "controllers", REPO_ARTIFACTS) if p is not None]
            path = find_artifact(name, self.rt.model_id, folders)
            if path is None:
                raise ModelArgError(
                    f"controller={name!r}: no {name} artifact for this model (fingerprint {self.rt.model_id}) in "
                    f"{', '.join(map(str, folders))}: build one (profiling / training) and pass its path, or use controller=static"
                )
            log.info("adaptive_molmoe: controller=%s uses %s", name, path)
        else:
            path = Path(str(name))
        if not path.is_file():
            raise ModelArgError(f"controller must be one of {', '.join(BUILTIN_CONTROLLERS)} or a controller artifact file, got {name!r}")
        controller = load_controller(read_artifact(path, self.rt.model_id, knobs), knobs, self.rt.question_summary)
        if controller.kind == "grpo" and self.budget is None:
            raise ModelArgError(f"controller={name!r} (grpo) decides per budget: give budget=<ms per request>")
        return controller

    # -- records ----------------------------------------------------------------------------------

    def _writer_for(self, request: Instance) -> RecordWriter:
        """Open the record file: `log_dir`, else next to the CLI's --output_path, else ./logs/adaptive_molmoe."""
        if self._writer is None:
            folder = self._log_dir or _cli_output_path(request) or DEFAULT_LOG_DIR
            stamp = time.strftime("%Y%m%d_%H%M%S")
            self._writer = RecordWriter(Path(folder) / f"adaptive_molmoe_{stamp}_rank{self.rank}.jsonl")
            log.info("adaptive_molmoe: request records -> %s", self._writer.path)
        return self._writer

    def _record(self, request: Instance, record: RequestRecord) -> None:
        if request.metadata and request.metadata.get("__padding_only__"):
            return  # multi-GPU padding clone: answered, not measured
        self._writer_for(request).write(record)
        self._records.append(json.loads(record.to_json()))

    def _report(self, records: list[dict[str, Any]]) -> None:
        """Aggregates into lmms-eval's results (`throughput`) and a summary JSON beside the records."""
        if not records or self._writer is None:
            return
        stats = summarize(records)
        metrics = {k: v for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        metrics["total_requests"] = len(records)
        metrics.update({f"frac_{knob}_{value}": count / len(records) for knob, hist in stats["knobs"].items() for value, count in hist.items()})
        elapsed_s = sum(r["total_ms"] for r in records) / 1000.0
        tokens = sum(r["n_output_tokens"] for r in records)
        log_metrics(elapsed_s, tokens, tokens / elapsed_s if elapsed_s else 0.0, metrics)
        summary = {"overall": stats, "by_task": summarize_by_task(records), "controller": self.controller.describe(), "budget_ms": self.budget}
        path = self._writer.path.with_suffix(".summary.json")
        path.write_text(json.dumps(summary, indent=2))

    # -- requests ---------------------------------------------------------------------------------

    def _decide(self, facts: RequestFacts) -> tuple[Plan | DeferredPlan, float]:
        """The controller's stage-1 decision and the ms it took."""
        start = time.perf_counter()
        decision = stage1_decision(self.controller, facts)
        return decision, (time.perf_counter() - start) * 1000.0

    def _doc_and_images(self, doc_to_visual: Callable, doc_id: int, task: str, split: str) -> tuple[Any, list[Any]]:
        doc = self.task_dict[task][split][doc_id]
        images = doc_to_visual(doc) if doc_to_visual is not None else []
        return doc, [im for im in (images or []) if im is not None]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        records_before = len(self._records)
        for request in tqdm(requests, desc="adaptive_molmoe", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            _, images = self._doc_and_images(doc_to_visual, doc_id, task, split)
            gen = generation_config(gen_kwargs, self.max_new_tokens)
            start = time.perf_counter()
            facts = self.rt.request_facts(context, images, self.budget, gen.max_new_tokens, task)
            decision, stage1_ms = self._decide(facts)
            out = self.rt.generate(context, images, decision, gen, style=task_style(task, self.style))
            total_ms = (time.perf_counter() - start) * 1000.0
            self._record(request, self._make_record(request, "generate_until", stage1_ms, total_ms, out))
            answers.append(out.text)
        self._report(self._records[records_before:])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="adaptive_molmoe loglikelihood", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            doc, images = self._doc_and_images(doc_to_visual, doc_id, task, split)
            if callable(continuation):
                continuation = continuation(doc)
            if isinstance(continuation, list):
                continuation = continuation[0]
            decision, _ = self._decide(self.rt.request_facts(context, images, self.budget, 0, task))
            prepared = self.rt.processor(context, images, max_crops=decision.max_crops, style=task_style(task, self.style))
            results.append(self.rt.score(prepared, self.rt.processor.encode_text(str(continuation)), decision))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("adaptive_molmoe does not support multi-round generation (generate_until_multi_round)")

    def _make_record(self, request: Instance, kind: str, stage1_ms: float, total_ms: float, out: Generation) -> RequestRecord:
        _, _, _, doc_id, task, split = request.args
        t = out.timings
        return RequestRecord(
            task=task,
            doc_id=int(doc_id),
            split=split,
            request_type=kind,
            controller=self.controller.describe(),
            budget_ms=self.budget,
            plan=out.plan.to_dict(),
            n_prompt_tokens=out.n_prompt_tokens,
            n_image_tokens=out.n_image_tokens,
            n_crops=out.n_crops,
            n_output_tokens=len(out.token_ids),
            controller_ms=stage1_ms + t.stage2_ms,
            preprocess_ms=t.preprocess_ms,
            vision_ms=t.vision_ms,
            prefill_ms=t.prefill_ms,
            decode_ms=t.decode_ms,
            total_ms=total_ms,
            violated=None if self.budget is None else total_ms > self.budget,
            stop_reason=out.stop_reason,
            model_fingerprint=self.rt.model_id,
            device=str(self.device),
        )


def generation_config(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> GenerationConfig:
    """lmms-eval's generation kwargs (until, max_new_tokens, temperature, do_sample, top_p) -> GenerationConfig."""
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    return GenerationConfig(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0) if do_sample else 1.0,
        stop=tuple(until),
    )


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
