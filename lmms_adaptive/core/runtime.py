"""One request end to end: preprocess -> vision -> prefill -> decode, executing a `Plan`, timed per stage.

    rt = AdaptiveMolmoe.from_pretrained("/ckpt/MolmoE-1B-0924")   # or a hub id; None: the built-in tiny model
    out = rt.generate("What is written?", [image], Plan(max_crops=6, top_k=6, n_blocks=14), style="text_vqa")
    out.text, out.token_ids, out.first_logits, out.timings.total_ms

A `DeferredPlan` (a two-stage controller's stage-1 decision) is completed during the prefill: blocks
0..p-1 run over the prompt with the latency token appended as a probe (one pass), its hidden state there
decides top-k and active blocks, and the prefill continues over the prompt with the rest of the plan.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lmms_adaptive.core.checkpoint import fingerprint, load_model, read_drop_order, resolve_checkpoint
from lmms_adaptive.core.config import ConfigError, MolmoeConfig
from lmms_adaptive.core.model import (
    DecodeStep,
    KVCache,
    LayerSchedule,
    MolmoeForCausalLM,
    count_parameters,
    decode_block,
)
from lmms_adaptive.core.plan import DeferredPlan, KnobSpace, Plan, RequestFacts
from lmms_adaptive.core.processor import (
    MolmoeProcessor,
    ProcessedRequest,
    VisionPreprocessConfig,
    crop_count,
    image_size,
    image_token_count,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    keep_step_logits: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class Timings:
    """Milliseconds at batch size 1, each stage closed by a device synchronisation."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0  # includes the latency token's row in blocks 0..p-1 and the stage-2 decision
    stage2_ms: float = 0.0  # the controller's stage-2 decision (DeferredPlan only)
    decode_ms: list[float] = field(default_factory=list)  # one entry per decode forward, in order
    total_ms: float = 0.0


@dataclass
class Execution:
    """What running one request measured, whatever was asked of it."""

    timings: Timings
    plan: Plan  # as executed (a DeferredPlan's completion)
    n_prompt_tokens: int
    n_image_tokens: int
    n_crops: int


@dataclass
class Generation(Execution):
    text: str
    token_ids: list[int]
    first_logits: Tensor  # [vocab] float32 on the CPU: the logits that chose the first token
    stop_reason: str  # "eos" | "stop" | "length"
    step_logits: list[Tensor] | None = None  # per generated token, when GenerationConfig.keep_step_logits


@dataclass
class Scored(Execution):
    """A continuation scored after the prompt (lmms-eval's `loglikelihood`)."""

    logprob: float
    greedy: bool  # greedy decoding would produce exactly the continuation


class Clock:
    """Wall clock in ms that first waits for the device, so stage boundaries are real."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000.0


def pick_token(logits: Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> int:
    """Greedy, or temperature + nucleus (top-p) sampling, from logits [vocab]."""
    if not gen.do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
    sorted_p, sorted_ids = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < gen.top_p  # smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p.cpu() / sorted_p.sum().cpu(), 1, generator=rng)
    return int(sorted_ids.cpu()[choice])


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class AdaptiveMolmoe:
    """A loaded MolmoE (model + processor + knob space) that runs requests under a per-request plan."""

    def __init__(
        self,
        model: MolmoeForCausalLM,
        processor: MolmoeProcessor,
        drop_order: Sequence[int] | None = None,
        model_id: str = "",
        folder: Path | None = None,
        compile_decode: bool = False,
    ) -> None:
        """`compile_decode` runs every decoder block of a decode step through one `torch.compile`d
        `decode_block` per top-k (CUDA graphs on a GPU), shared by every block, schedule and runtime of the
        process; `warmup_decode` compiles the knob space's top-k values up front."""
        self.model = model
        self.folder = folder
        self.processor = processor
        self.knobs = KnobSpace.from_config(model.config)
        self.drop_order = tuple(drop_order) if drop_order is not None else self.knobs.default_drop_order()
        self.model_id = model_id
        self.device = model.lm_head.weight.device
        self.clock = Clock(self.device)
        self.compiled = compile_decode
        self.decode_step = compiled_decode_block(self.device) if compile_decode else decode_block

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        compile_decode: bool | str = False,
        revision: str | None = None,
    ) -> AdaptiveMolmoe:
        """Load a checkpoint folder or hub id at `revision` (`resolve_checkpoint`; default: the built-in model).
        `compile_decode`: True/"on", False/"off", or "auto" (`compile_pays`)."""
        folder = resolve_checkpoint(folder, revision)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, device)
        processor = MolmoeProcessor.from_pretrained(folder)
        check_preprocessor(MolmoeConfig.from_folder(folder), processor.vision, Path(folder))
        model = load_model(folder, device, torch_dtype)
        model_id = fingerprint(folder)
        log.info("loaded %s on %s (%s)", folder, device, torch_dtype)
        compiled = resolve_compile(compile_decode, model)
        return cls(model, processor, read_drop_order(Path(folder), model_id), model_id, Path(folder), compiled)

    @property
    def device_name(self) -> str:
        """The device as records name it: the GPU's name, or the CPU with its thread count."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    # -- requests ---------------------------------------------------------------------------------

    def schedule(self, plan: Plan) -> LayerSchedule:
        return self.knobs.schedule(plan, self.drop_order)

    def generate(
        self,
        question: str,
        images: Sequence[Any] | Any | None = None,
        plan: Plan | DeferredPlan | None = None,
        gen: GenerationConfig | None = None,
        style: str | None = None,
    ) -> Generation:
        """Preprocess and run one request; `timings.total_ms` includes the preprocessing."""
        plan = plan or self.knobs.full_plan()
        start = self.clock.now()
        request = self.processor(question, images, max_crops=plan.max_crops, style=style)
        preprocess_ms = self.clock.now() - start
        out = self.run(request, plan, gen)
        out.timings.preprocess_ms = preprocess_ms
        out.timings.total_ms += preprocess_ms
        return out

    def vision(self, request: ProcessedRequest) -> tuple[Tensor | None, Tensor | None]:
        """The vision stage: image features and the positions they are added at (None without images)."""
        if request.images is None:
            return None, None
        dev = self.device
        features = self.model.encode_images(
            torch.as_tensor(request.images, device=dev), torch.as_tensor(request.image_masks, device=dev)
        )
        return features, torch.as_tensor(request.image_input_idx, device=dev)

    def _embed_prompt(self, request: ProcessedRequest) -> Tensor:
        """Vision stage + token embeddings of the prompt with the image features added: [1, n_prompt, D]."""
        ids = torch.as_tensor(request.input_ids, device=self.device)[None]
        features, idx = self.vision(request)
        return self.model.embed(ids, features, idx)

    def _run_head(
        self, x: Tensor, insert_pos: int, renormalize: bool, cache: KVCache, latency_token: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Blocks 0..p-1 over the prompt x [1, n, D] with the latency token riding along at position n, in one
        pass: causal attention lets the token see the whole prompt while no prompt position sees it, and the
        first decode step (also at position n) overwrites its cache slot. So the probe costs one extra row in
        a pass every plan with this insertion position runs anyway, not a pass of its own. Returns the prompt's
        hidden states [1, n, D] and the token's [d_model] float32, what stage 2 sees."""
        token = latency_token.to(self.device, x.dtype).reshape(1, 1, -1)
        head = self.knobs.head_layers(insert_pos)
        out = self.model.run_blocks(
            torch.cat([x, token], 1), self._prompt_rope(x.shape[1] + 1), head, renormalize, cache
        )
        return out[:, :-1], out[0, -1].float()

    def _prompt_rope(self, n_prompt: int) -> tuple[Tensor, Tensor]:
        return self.model.rope(torch.arange(n_prompt, device=self.device)[None])

    @torch.inference_mode()
    def latency_hidden(
        self, request: ProcessedRequest, insert_pos: int, latency_token: Tensor, renormalize: bool = False
    ) -> Tensor:
        """What stage 2 sees for this request and stage-1 decision, without generating (GRPO training)."""
        x = self._embed_prompt(request)
        return self._run_head(x, insert_pos, renormalize, self.model.new_cache(x.shape[1] + 1), latency_token)[1]

    @torch.inference_mode()
    def _non_finite_message(self, request: ProcessedRequest, plan: Plan, schedule: LayerSchedule) -> str:
        """Where a request's computation first holds NaN or infinite values: each stage run again, checked."""
        model = self.model
        features, idx = self.vision(request)
        x = model.embed(torch.as_tensor(request.input_ids, device=self.device)[None], features, idx)
        rope = self._prompt_rope(x.shape[1])
        stages = [("the vision encoder's output", features), ("the token embeddings", x)]
        for block, top_k in schedule.layers:
            x = model.run_blocks(x, rope, [(block, top_k)], schedule.renormalize)
            stages.append((f"decoder block {block}", x))
        stages.append(("the final norm", model.final_norm(x)))
        where = next((name for name, out in stages if out is not None and not torch.isfinite(out).all()), "the LM head")
        return (
            f"non-finite logits under {plan}: the first NaN or infinite values appear in {where} "
            "(check the checkpoint's weights and config values)"
        )

    def _room_after(self, request: ProcessedRequest, max_crops: int) -> int:
        """Positions of the context left after the prompt; a prompt longer than the context is refused."""
        limit = self.model.config.max_sequence_length
        if request.n_tokens > limit:
            raise ValueError(
                f"the prompt is {request.n_tokens} tokens ({request.n_image_tokens} of them image tokens at max_crops "
                f"{max_crops}), over the model's context of {limit} (config.json max_sequence_length): "
                "ask for fewer crops or a shorter question"
            )
        return limit - request.n_tokens

    @torch.inference_mode()
    def run(
        self,
        request: ProcessedRequest,
        plan: Plan | DeferredPlan,
        gen: GenerationConfig | None = None,
        schedule: LayerSchedule | None = None,
    ) -> Generation:
        """Execute an already preprocessed request with `plan` (its max_crops must match the request's).
        `schedule` overrides a Plan's decoder schedule (analysis only, e.g. removing a single block).
        Generation stops at the end of the model's context (stop reason "length"); a prompt longer than the
        context is refused."""
        gen = gen or GenerationConfig()
        if schedule is not None and isinstance(plan, DeferredPlan):
            raise ValueError("a schedule override needs a complete Plan, not a DeferredPlan")
        clock, model, dev = self.clock, self.model, self.device
        max_new_tokens = min(gen.max_new_tokens, self._room_after(request, plan.max_crops) + 1)
        timings = Timings()
        t0 = clock.now()

        x = self._embed_prompt(request)
        t1 = clock.now()
        timings.vision_ms = t1 - t0

        n_prompt = x.shape[1]
        rope = self._prompt_rope(n_prompt)
        cache = model.new_cache(n_prompt + max_new_tokens)
        done = 0  # schedule entries already run over the prompt
        if isinstance(plan, DeferredPlan):
            x, hidden = self._run_head(x, plan.insert_pos, plan.renormalize, cache, plan.latency_token)
            t_head = clock.now()
            plan, done = plan.complete(hidden), plan.insert_pos
            timings.stage2_ms = clock.now() - t_head
        schedule = schedule or self.schedule(plan)
        x = model.run_blocks(x, rope, schedule.layers[done:], schedule.renormalize, cache)
        cache.length = n_prompt
        logits = model.logits(model.final_norm(x)[0, -1]).float()
        t2 = clock.now()
        timings.prefill_ms = t2 - t1

        rng = torch.Generator().manual_seed(gen.seed) if gen.do_sample else None
        eos = self.processor.special.eos
        first_logits = logits.cpu()
        if not torch.isfinite(first_logits).all():
            raise FloatingPointError(self._non_finite_message(request, plan, schedule))
        step_logits = [first_logits] if gen.keep_step_logits else None
        tokens: list[int] = []
        text, stop_reason = "", "length"
        while True:
            token = pick_token(logits, gen, rng)
            if token == eos and gen.stop_at_eos:
                stop_reason = "eos"
                break
            tokens.append(token)
            if gen.stop:
                text = self.processor.decode(tokens)
                cut = first_stop(text, gen.stop)
                if cut is not None:
                    text, stop_reason = text[:cut], "stop"
                    break
            if len(tokens) >= max_new_tokens:
                break
            t_step = clock.now()
            position = torch.tensor([cache.length], device=dev)
            embedded = model.embed(torch.tensor([[token]], device=dev))
            logits = model.decode_token(embedded, position, schedule, cache, self.decode_step)
            cache.length += 1
            if step_logits is not None:
                step_logits.append(logits.cpu())
            timings.decode_ms.append(clock.now() - t_step)
        if stop_reason != "stop":
            text = self.processor.decode(tokens)
        timings.total_ms = clock.now() - t0
        return Generation(
            text=text.strip(),
            token_ids=tokens,
            first_logits=first_logits,
            timings=timings,
            plan=plan,
            n_prompt_tokens=n_prompt,
            n_image_tokens=request.n_image_tokens,
            n_crops=request.n_crops,
            stop_reason=stop_reason,
            step_logits=step_logits,
        )

    @torch.inference_mode()
    def score(
        self,
        question: str,
        images: Sequence[Any] | Any | None,
        continuation: Sequence[int],
        plan: Plan | DeferredPlan,
        style: str | None = None,
    ) -> Scored:
        """Log-probability of `continuation` token ids after the prompt, and whether greedy decoding would
        produce exactly them, under `plan` (a DeferredPlan is completed on the prompt alone). One pass over
        prompt + continuation, timed like `generate` (that pass is the prefill)."""
        if not continuation:
            raise ValueError("score: the continuation is empty")
        clock, model, dev = self.clock, self.model, self.device
        timings = Timings()
        start = clock.now()
        request = self.processor(question, images, max_crops=plan.max_crops, style=style)
        if self._room_after(request, plan.max_crops) < len(continuation):
            raise ValueError(
                f"score: the prompt ({request.n_tokens} tokens) and the continuation ({len(continuation)}) exceed the "
                f"model's context of {self.model.config.max_sequence_length} tokens"
            )
        t0 = clock.now()
        features, idx = self.vision(request)
        t1 = clock.now()
        ids = torch.as_tensor(
            np.concatenate([request.input_ids, np.asarray(continuation, dtype=np.int64)]), device=dev
        )[None]
        x = model.embed(ids, features, idx)
        if isinstance(plan, DeferredPlan):
            n_prompt = len(request.input_ids)
            cache = model.new_cache(n_prompt + 1)
            _, hidden = self._run_head(x[:, :n_prompt], plan.insert_pos, plan.renormalize, cache, plan.latency_token)
            t_head = clock.now()
            plan = plan.complete(hidden)
            timings.stage2_ms = clock.now() - t_head
        positions = torch.arange(ids.shape[1], device=dev)[None]
        hidden = model.decode_layers(x, positions, self.schedule(plan))
        n = len(continuation)
        logprobs = torch.log_softmax(model.logits(hidden[0, -n - 1 : -1]).float(), dim=-1)
        target = ids[0, -n:]
        total = logprobs.gather(-1, target[:, None]).sum()
        greedy = bool((logprobs.argmax(-1) == target).all())
        end = clock.now()
        timings.preprocess_ms, timings.vision_ms, timings.prefill_ms = t0 - start, t1 - t0, end - t1
        timings.total_ms = end - start
        return Scored(
            timings, plan, len(request.input_ids), request.n_image_tokens, request.n_crops, float(total), greedy
        )

    def request_facts(
        self,
        question: str,
        images: Sequence[Any],
        budget_ms: float | None,
        max_new_tokens: int,
        task: str | None = None,
    ) -> RequestFacts:
        """What a controller may know before the vision encoder: exact prompt tokens and ViT crops per tier
        (from the image sizes alone), the question's token count and the generation length."""
        vision = self.processor.vision
        sizes = tuple(image_size(im) for im in images)
        question_ids = tuple(self.processor.encode_text(question))
        text_tokens = len(question_ids) + 1
        per_tier = {
            c: text_tokens + sum(image_token_count(h, w, c, vision) for h, w in sizes) for c in self.knobs.tiers
        }
        crops = {c: sum(crop_count(h, w, c, vision) for h, w in sizes) for c in self.knobs.tiers}
        return RequestFacts(
            budget_ms, question, sizes, per_tier, crops, text_tokens, max_new_tokens, task, question_ids
        )

    @torch.inference_mode()
    def question_summary(self, question_ids: Sequence[int]) -> Tensor:
        """The question's mean token embedding in the model's own (frozen) table, float32 [d_model] on the CPU
        (zeros for an empty question): what a learned controller's stage 1 reads of the question."""
        table = self.model.model.transformer.wte.embedding
        if not question_ids:
            return torch.zeros(table.shape[1], dtype=torch.float32)
        ids = torch.as_tensor(question_ids, dtype=torch.long, device=table.device)
        return table[ids].float().mean(dim=0).cpu()

    def warmup(self, plans: Sequence[Plan] | None = None, steps: int = 2) -> None:
        """Run throw-away requests so first-call costs (allocations, kernel selection, with a compiled decode
        the graphs of every top-k option) are not timed."""
        if self.compiled:
            self.warmup_decode()
        image = np.full((480, 640, 3), 127, dtype=np.uint8)
        for plan in plans or [self.knobs.full_plan(self.knobs.tiers[0])]:
            self.generate("warm up", [image], plan, GenerationConfig(max_new_tokens=steps, stop_at_eos=False))

    @torch.inference_mode()
    def warmup_decode(self) -> float:
        """Compile the decode block for every top-k option of the knob space (the whole plan space: a plan
        only chooses which blocks run at which of these k), once per process; returns the seconds it took."""
        start = time.perf_counter()
        model, dev = self.model, self.device
        x = model.embed(torch.zeros(1, 1, dtype=torch.long, device=dev))
        cache = model.new_cache(1)
        position = torch.zeros(1, dtype=torch.long, device=dev)
        for top_k in tqdm(self.knobs.top_k_options, desc="compiling decode", unit="top-k", leave=False):
            model.decode_token(x, position, LayerSchedule(((0, top_k),)), cache, self.decode_step)
        seconds = time.perf_counter() - start
        log.info("decode graphs for top-k %s ready in %.1fs", list(self.knobs.top_k_options), seconds)
        return seconds


_COMPILED_STEPS: dict[str, DecodeStep] = {}


COMPILE_MIN_PARAMETERS = 50_000_000  # "auto" compiles from here (see docs/speed.md: the tiny model loses)


def compile_pays(model: MolmoeForCausalLM) -> bool:
    """Whether a compiled decode pays for its warm-up: a compiler is available and the model is big enough."""
    return compiler_available(model.lm_head.weight.device) and count_parameters(model) >= COMPILE_MIN_PARAMETERS


def resolve_compile(choice: bool | str, model: MolmoeForCausalLM) -> bool:
    """True/"on", False/"off" or "auto" (`compile_pays`) -> whether to compile the decode step."""
    named = {"on": True, "true": True, "off": False, "false": False}
    if isinstance(choice, bool):
        return choice
    if choice == "auto":
        return compile_pays(model)
    if choice not in named:
        raise ValueError(f"compile must be one of auto, on, off, got {choice!r}")
    return named[choice]


def compiled_decode_block(device: torch.device) -> DecodeStep:
    """`decode_block` under torch.compile, one per process and device type: fullgraph (a graph break would
    silently cost the speed-up), CUDA graphs on a GPU ("reduce-overhead"). A block's weights and cache are
    inputs and the attended window's length is dynamic, so one graph per top-k (and renormalize) serves every
    block of every schedule at every position."""
    if device.type not in _COMPILED_STEPS:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        _COMPILED_STEPS[device.type] = torch.compile(decode_block, mode=mode, fullgraph=True)
    graph = _COMPILED_STEPS[device.type]

    def step(x, w, keys, values, position, rope, mask, top_k, renormalize, eps) -> Tensor:
        for t, dim in ((keys, 2), (values, 2), (mask, 3)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return graph(x, w, keys, values, position, rope, mask, top_k, renormalize, eps)

    return step


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: a C++ compiler on the CPU, Triton on CUDA."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def check_preprocessor(config: MolmoeConfig, vision: VisionPreprocessConfig, folder: Path) -> None:
    """The checkpoint's preprocessor_config.json must cut the crops its ViT was built for."""
    patches = vision.crop_patches**2
    found = {"image_patch_size": vision.image_patch_size, "patches per crop + 1": patches + 1}
    wanted = {"image_patch_size": config.vision.patch_size, "patches per crop + 1": config.vision.n_positions}
    if found != wanted:
        raise ConfigError(
            f"{folder / 'preprocessor_config.json'} ({found}) disagrees with the ViT of {folder / 'config.json'} "
            f"(vision_backbone image_patch_size / image_num_pos: {wanted})"
        )


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bf16 on a GPU, fp32 elsewhere; accepts 'bf16'/'bfloat16'/'fp32'/'float32'/'fp16'/'float16'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)} or auto, got {dtype!r}")
    return names[dtype]
