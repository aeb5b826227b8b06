"""Train the embedded default: a tiny MolmoE, from scratch, on the synthetic visual-QA suite, elastically.

    python -m lmms_adaptive.default.pretrain OUT_DIR                      # train (resumes if OUT_DIR has a state)
    python -m lmms_adaptive.default.pretrain OUT_DIR --steps 40 --eval-every 20  # a quick smoke run

Two stages. The vision stage trains the vision backbone alone (ViT, pooling, projector) on the global
views of training scenes and on crops of sign sheets (`synthetic.sign_sheet`: rows of numbers at the
scale a tier's crop shows them), against throw-away read-outs of its output tokens (:class:`SceneHeads`):
under each token, which shape kind and colour, or which digit and its place in the number, lies there
(dense labels drawn from the scene itself, see `synthetic.view_labels`), and per image the object count
and the single object's shape and colour. A ViT trained from scratch through the decoder alone memorises
instead of generalising within a CPU budget; the dense labels give it dozens of targets per image, as a
pretrained CLIP encoder does the real model. Its last steps are mostly sign sheets again, which sharpens
the glyph tokens, and the decoder stage keeps the backbone frozen (a read-out only follows features that
hold still). Each decoder step draws one plan (max_crops from the tiers, a top-k from the knob
space's options, and a random set of dropped blocks as the plan space allows) and trains next-token
prediction of the answers under it, so the model works across plans and degrades gracefully toward cheap
ones. Each image carries several questions about its scene in one row (:class:`Batch`): every question sees
the image and itself only, exactly as if asked alone, so the image tokens that make up most of a row are
paid once for all of them. A throw-away read-out (:class:`QuestionHead`) asks the early blocks for the
colour each question names, which a yes/no answer looks up in the image, and on reading images one block
is taught where to look (:func:`route_loss`: from the position writing each digit to that glyph's tokens;
on `detail` images, from the position writing the colour to the mark's tokens, :func:`mark_tokens`).
The prompt is exactly what evaluation sends (question + lmms-eval's post-prompt, Molmo chat format).

Steps are deterministic functions of (seed, step): the plan, the samples and their order, so a resumed
run continues the same run. Writes into OUT_DIR: `state.pt` (resume point), `vision_metrics.csv`
(vision-stage losses and read-out accuracies), `metrics.csv` (decoder loss curve), `eval.csv` (validation
accuracy per tier and question type), `curves.png`, and `checkpoint/` (the trained model in the real
checkpoint format, weights in bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import Tensor

from lmms_adaptive.core.checkpoint import load_model, save_weights
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import LayerSchedule, MolmoeForCausalLM
from lmms_adaptive.core.plan import KnobSpace, Plan
from lmms_adaptive.core.processor import (
    MolmoeProcessor,
    ProcessedRequest,
    VisionPreprocessConfig,
    format_prompt,
    patchify,
    resize_and_pad,
    to_rgb_array,
)
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig
from lmms_adaptive.default import synthetic
from lmms_adaptive.default.tiny import build_tiny
from lmms_adaptive.tools.cli import HelpFormatter, progress, setup_logging, took
from lmms_adaptive.tools.runlog import (
    check_settings,
    exclusive,
    plot_with_mean,
    read_rows,
    save_atomic,
    truncate_csv,
    write_rows,
)

log = logging.getLogger(__name__)

# What lmms-eval's textvqa / pope task configs append to the question (their default post_prompt).
POST_PROMPT = "\nAnswer the question using a single word or phrase."
# Shapes, counts and yes/no twice per cycle, reading four times: the types with the most answers, and a
# reading image carries one question where a shape scene carries several.
TRAIN_MIX = ("color", "shape", "count", "yesno", "read", "shape", "count", "yesno", "read", "read", "read")


TEXT_SETTINGS = ("mix", "init")  # string settings: checked in PretrainConfig.__post_init__ on their own
NON_NEGATIVE = (
    "weight_decay", "vision_steps", "vision_read_steps", "vision_sharpen_steps", "vision_lr_scale", "detail_every",
)  # fmt: skip


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 700
    batch_size: int = 16  # images per decoder step
    questions_per_image: int = 6  # each image's own question and up to this many - 1 more about its scene
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    full_plan_prob: float = 0.25  # share of steps at the full decoder (any tier)
    vision_steps: int = 2000  # vision-stage steps before the decoder steps
    vision_read_steps: int = 500  # the first vision steps see vision_batch_size sign-sheet crops only
    vision_sharpen_steps: int = 400  # the last vision steps swap the mix: more sheets than shape views
    vision_batch_size: int = 32  # views per vision step: global views of shape scenes between those phases
    vision_sheets: int = 16  # sign-sheet crops per vision step between those phases, on top
    vision_lr: float = 1e-3
    vision_pool: int = 6400  # distinct vision-stage scenes (reused in turn)
    vision_lr_scale: float = 0.0  # the vision backbone's lr in the decoder stage, relative to lr (0: frozen)
    seed: int = 0
    eval_every: int = 200
    eval_samples: int = 40  # validation samples per evaluation (each run at every tier)
    save_every: int = 50
    mix: str = ",".join(TRAIN_MIX)  # question types the decoder steps cycle through, comma-separated
    detail_every: int = 0  # every N-th decoder step: detail images only, at the top tier (0: no such steps)
    init: str = ""  # a checkpoint folder to fine-tune (its config and tokenizer are kept); "": from scratch

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train_mix) - set(synthetic.PLANNERS))
        if not self.mix or unknown:
            raise ValueError(
                f"pretrain config: mix must be comma-separated question types of {sorted(synthetic.PLANNERS)}, "
                f"got {self.mix!r}"
            )
        if self.init and not (Path(self.init) / "config.json").is_file():
            raise ValueError(f"pretrain config: init must be a checkpoint folder with a config.json, got {self.init!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in TEXT_SETTINGS:
                continue
            if f.name in NON_NEGATIVE:
                if not value >= 0:
                    raise ValueError(f"pretrain config: {f.name} must be >= 0, got {value!r}")
            elif f.name != "seed" and not value > 0:
                raise ValueError(f"pretrain config: {f.name} must be > 0, got {value!r}")
        if self.vision_read_steps + self.vision_sharpen_steps > self.vision_steps:
            raise ValueError(
                "pretrain config: vision_read_steps + vision_sharpen_steps must be <= vision_steps, got "
                f"{self.vision_read_steps} + {self.vision_sharpen_steps} > {self.vision_steps}"
            )

    @property
    def train_mix(self) -> tuple[str, ...]:
        return tuple(q.strip() for q in self.mix.split(","))

    def lr_at(self, step: int) -> float:
        """Decoder stage: linear warm-up, then cosine decay to lr * min_lr_ratio."""
        return warmup_cosine(step, self.steps, self.warmup_steps, self.lr, self.min_lr_ratio)

    def vision_lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.vision_steps, self.warmup_steps, self.vision_lr, self.min_lr_ratio)


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------
# Steps: a plan and a batch, both functions of (seed, step)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """What one training step runs: the tier (processor) and the decoder schedule."""

    max_crops: int
    schedule: LayerSchedule


def sample_step_plan(space: KnobSpace, seed: int, step: int, full_plan_prob: float) -> StepPlan:
    """A random point of the plan space at insertion position 1; the dropped blocks are any of 1..L-1 (a random
    drop order, not the importance ranking, so the model learns to work without any of them)."""
    rng = random.Random(f"plan/{seed}/{step}")
    max_crops = rng.choice(space.tiers)
    if rng.random() < full_plan_prob:
        return StepPlan(max_crops, space.schedule(space.full_plan(max_crops)))
    plan = Plan(max_crops, rng.choice(space.top_k_options), rng.choice(space.block_options(1)))
    dropped = rng.sample(range(1, space.n_layers), space.n_layers - plan.n_blocks)
    order = dropped + [i for i in range(space.n_layers) if i not in dropped]
    return StepPlan(max_crops, space.schedule(plan, order))


def train_sample(seed: int, index: int, mix: tuple[str, ...] = TRAIN_MIX) -> synthetic.Sample:
    """The `index`-th training sample: question types cycle through `mix`."""
    cycle, slot = divmod(index, len(mix))
    qtype = mix[slot]
    return synthetic.make_sample("train", seed, qtype, cycle * mix.count(qtype) + mix[:slot].count(qtype))


def sample_questions(sample: synthetic.Sample, rng: random.Random, limit: int) -> list[tuple[str, str, str]]:
    """(question, answer, qtype): the sample's own, then others about its scene (`synthetic.questions_about`),
    `limit` in all."""
    others = [qa for qa in synthetic.questions_about(sample.scene, rng) if qa[0] != sample.question]
    return [(sample.question, sample.answer, sample.qtype), *others[: limit - 1]]


class TensorFields:
    """A dataclass of tensors (and plain values) that moves to a device as one."""

    def to(self, device: torch.device):
        moved = {
            f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclass
class Batch(TensorFields):
    """One row per image: the image prefix (BOS and image tokens), then one segment per question (prompt
    text, answer, EOS), right-padded. Each segment sits at the positions right after the prefix and
    attends to the prefix and to itself only (`attention_mask`), so every question is trained exactly as
    if it were alone with the image, while the image costs one pass. Loss only where `labels` >= 0."""

    input_ids: Tensor  # [B, L]
    labels: Tensor  # [B, L], the next token to predict at each position or -1
    positions: Tensor  # [B, L]: each segment restarts after the prefix
    segments: Tensor  # [B, L]: 0 the image prefix, 1.. the questions, -1 padding
    crops: Tensor  # [sum of crops, patches, patch_dim], every sample's crops concatenated
    crop_masks: Tensor  # [sum of crops, patches]
    crops_per_sample: list[int]
    image_input_idx: Tensor  # [B, max crops, tokens per crop], -1 where none
    answer_at: Tensor  # [Q, 2]: (row, position) where each question's answer is predicted, in segment order
    label_question: Tensor  # [B, L]: which question (0..Q-1) each label belongs to, -1 where no label
    named: Tensor  # [Q]: the colour each question names (`synthetic.named_color`)
    asked: Tensor  # [Q]: the colour a detail question's answer is (its mark's, `detail_color`), 0 for others
    route_at: Tensor  # [G, 2]: (row, position) writing a reading answer's digit ...
    route_keys: Tensor  # [G, K]: ... and the positions of that digit's glyph tokens, -1 padded

    @property
    def n_answer_tokens(self) -> int:
        return int((self.labels >= 0).sum())

    def attention_mask(self) -> Tensor:
        """[B, 1, L, L]: causal, and a token sees the prefix and its own segment (padding sees padding)."""
        width = self.input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.segments.device).tril()
        seg_q, seg_k = self.segments[:, :, None], self.segments[:, None, :]
        return (causal & ((seg_k == 0) | (seg_k == seg_q)))[:, None]


def answer_ids(tokenizer: Tokenizer, answer: str, eos: int) -> list[int]:
    """The answer as the model should generate it after "Assistant:": a leading space, then EOS."""
    return tokenizer.encode(" " + answer, add_special_tokens=False).ids + [eos]


GLYPH_TOUCHED = 0.05  # a token shows a glyph when its change is at least this share of the most changed token's
GLYPH_OWNED = 0.5  # ... and a glyph owns it when erasing that glyph makes more than this share of its change


@dataclass
class GlyphTokens:
    """A reading request and, per glyph place, how much erasing that glyph changes each image token."""

    request: ProcessedRequest
    change: np.ndarray  # [places, crops, tokens per crop]

    def touched(self) -> np.ndarray:
        total = self.change.sum(0)
        return total >= GLYPH_TOUCHED * total.max()

    def owned(self, place: int) -> np.ndarray:
        return self.touched() & (self.change[place] > GLYPH_OWNED * self.change.sum(0))

    def positions(self, tokens: np.ndarray) -> np.ndarray:
        """Sequence positions of the selected [crops, tokens] (tokens a crop drops have none)."""
        idx = self.request.image_input_idx[tokens]
        return idx[idx >= 0].astype(np.int64)


def glyph_tokens(
    processor: MolmoeProcessor, sample: synthetic.Sample, request: ProcessedRequest, max_crops: int
) -> GlyphTokens:
    """Where a reading request shows each glyph: `request` is `sample` processed at `max_crops`; each glyph is
    erased in turn (`synthetic.erase_glyph`) and the image processed again."""
    (text,) = sample.scene.texts
    changes = []
    for place in range(len(text.text)):
        image = synthetic.erase_glyph(sample.image, text, place)
        changes.append(token_change(request, processor(sample.question + POST_PROMPT, [image], max_crops=max_crops)))
    return GlyphTokens(request, np.stack(changes))


def mark_tokens(
    processor: MolmoeProcessor, sample: synthetic.Sample, request: ProcessedRequest, max_crops: int
) -> GlyphTokens:
    """Where a detail request shows its mark, as one glyph place: the mark painted over (`synthetic.erase_mark`)."""
    image = synthetic.erase_mark(sample.image, sample.scene)
    erased = processor(sample.question + POST_PROMPT, [image], max_crops=max_crops)
    return GlyphTokens(request, token_change(request, erased)[None])


def token_change(request: ProcessedRequest, erased: ProcessedRequest) -> np.ndarray:
    """[crops, tokens per crop]: how much each image token's pixels change between two processed images."""
    n_crops, n_patches, _ = request.images.shape
    side = math.isqrt(n_patches) // 2  # pooled tokens per crop side: a token is 2 x 2 patches
    diff = np.abs(request.images - erased.images).sum(-1)  # [crops, patches]
    return diff.reshape(n_crops, side, 2, side, 2).sum(axis=(2, 4)).reshape(n_crops, -1)


@dataclass(frozen=True)
class ImageQuestions:
    """One processed image and the questions asked of it: `prefix` is the request's tokens up to the text,
    each segment (prompt ids, answer ids) what a request with that question would append. A reading image
    also carries where it shows each glyph: what the position writing that digit of its answer should
    look at."""

    request: ProcessedRequest
    segments: list[tuple[list[int], list[int]]]
    named: list[int]  # per segment, the colour its question names
    asked: list[int]  # per segment, `detail_color` of its answer
    glyphs: GlyphTokens | None = None
    # the position writing place p of the first answer is (its first answer token's) + route_from + p: 0 for a
    # number (its leading space writes the first digit), -1 for a detail colour (one token, the prompt's last
    # position writes it)
    route_from: int = 0

    def glyph_positions(self) -> list[np.ndarray]:
        """Per glyph place, the sequence positions of the image tokens that glyph owns (none: not a reading image)."""
        if self.glyphs is None:
            return []
        return [self.glyphs.positions(self.glyphs.owned(p)) for p in range(len(self.glyphs.change))]

    @property
    def prefix(self) -> np.ndarray:
        return self.request.input_ids[: 1 + self.request.n_image_tokens]


def image_questions(
    processor: MolmoeProcessor, sample: synthetic.Sample, qas: list[tuple[str, str, str]], max_crops: int, eos: int
) -> ImageQuestions:
    """The sample's image processed once, each (question, answer, qtype) tokenized exactly as evaluation sends
    it, and a reading sample's glyph tokens."""
    request = processor(qas[0][0] + POST_PROMPT, [sample.image], max_crops=max_crops)
    segments = [
        (processor.encode_text(format_prompt(q + POST_PROMPT)), answer_ids(processor.tokenizer, a, eos))
        for q, a, _ in qas
    ]
    named = [synthetic.named_color(q) for q, _, _ in qas]
    asked = [detail_color(a, qtype) for _, a, qtype in qas]
    if sample.qtype == "detail":
        return ImageQuestions(request, segments, named, asked, mark_tokens(processor, sample, request, max_crops), -1)
    glyphs = glyph_tokens(processor, sample, request, max_crops) if sample.qtype == "read" else None
    return ImageQuestions(request, segments, named, asked, glyphs)


def detail_color(answer: str, qtype: str) -> int:
    """The target of :class:`QuestionHead`'s mark read-out: ``i + 1`` for the ``i``-th of ``COLORS`` when a
    detail question's answer is that colour, 0 for any other question."""
    return 1 + list(synthetic.COLORS).index(answer) if qtype == "detail" else 0


def collate(items: list[ImageQuestions], pad_id: int) -> Batch:
    rows, answer_at, route = [], [], []
    for row, item in enumerate(items):
        prefix = item.prefix.tolist()
        ids, labels, positions, segments = list(prefix), [-1] * len(prefix), list(range(len(prefix))), [0] * len(prefix)
        owner = [-1] * len(prefix)
        for s, (prompt, answer) in enumerate(item.segments, start=1):
            owner += [-1] * (len(prompt) - 1) + [len(answer_at)] * len(answer) + [-1]
            if s == 1:  # the position of the answer's leading space writes its first digit (see route_from)
                first_digit = len(ids) + len(prompt) + item.route_from
                route += [((row, first_digit + p), k) for p, k in enumerate(item.glyph_positions()) if len(k)]
            answer_at.append((row, len(ids) + len(prompt) - 1))
            ids += prompt + answer
            labels += [-1] * (len(prompt) - 1) + answer + [-1]  # position of the prompt's last token predicts answer[0]
            positions += range(len(prefix), len(prefix) + len(prompt) + len(answer))
            segments += [s] * (len(prompt) + len(answer))
        rows.append((ids, labels, positions, segments, owner))
    width = max(len(r[0]) for r in rows)

    def padded(column: int, value: int) -> Tensor:
        return torch.tensor([r[column] + [value] * (width - len(r[column])) for r in rows], dtype=torch.int64)

    requests = [item.request for item in items]
    per_crop = requests[0].image_input_idx.shape[1]
    idx = np.full((len(items), max(r.n_crops for r in requests), per_crop), -1, dtype=np.int64)
    for b, r in enumerate(requests):
        idx[b, : r.n_crops] = r.image_input_idx
    route_keys = np.full((len(route), max((len(k) for _, k in route), default=0)), -1, dtype=np.int64)
    for g, (_, keys) in enumerate(route):
        route_keys[g, : len(keys)] = keys
    return Batch(
        input_ids=padded(0, pad_id),
        labels=padded(1, -1),
        positions=padded(2, 0),
        segments=padded(3, -1),
        crops=torch.from_numpy(np.concatenate([r.images for r in requests])),
        crop_masks=torch.from_numpy(np.concatenate([r.image_masks for r in requests])),
        crops_per_sample=[r.n_crops for r in requests],
        image_input_idx=torch.from_numpy(idx),
        answer_at=torch.tensor(answer_at, dtype=torch.int64),
        label_question=padded(4, -1),
        named=torch.tensor([n for item in items for n in item.named], dtype=torch.int64),
        asked=torch.tensor([a for item in items for a in item.asked], dtype=torch.int64),
        route_at=torch.tensor([at for at, _ in route], dtype=torch.int64).reshape(-1, 2),
        route_keys=torch.from_numpy(route_keys),
    )


class StepStream(torch.utils.data.IterableDataset):
    """(step, StepPlan, Batch) for steps start..cfg.steps-1; runs in a loader worker, so rendering and
    preprocessing overlap the training step."""

    def __init__(self, folder: Path, cfg: PretrainConfig, start: int) -> None:
        self.folder, self.cfg, self.start = folder, cfg, start

    def __iter__(self) -> Iterator[tuple[int, StepPlan, Batch]]:
        torch.set_num_threads(1)
        processor = MolmoeProcessor.from_pretrained(self.folder)
        space = KnobSpace.from_config(MolmoeConfig.from_folder(self.folder))
        cfg, eos, pad = self.cfg, processor.special.eos, processor.tokenizer.token_to_id("<|padding|>")
        for step in range(self.start, cfg.steps):
            plan, mix = sample_step_plan(space, cfg.seed, step, cfg.full_plan_prob), cfg.train_mix
            if cfg.detail_every and (step + 1) % cfg.detail_every == 0:  # the mark is readable at the top tier only
                plan, mix = dataclasses.replace(plan, max_crops=space.tiers[-1]), synthetic.DETAIL_QTYPES
            items = []
            for index in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
                sample = train_sample(cfg.seed, index, mix)
                qas = sample_questions(sample, random.Random(f"questions/{cfg.seed}/{index}"), cfg.questions_per_image)
                items.append(image_questions(processor, sample, qas, plan.max_crops, eos))
            yield step, plan, collate(items, pad)


def group_mean(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Mean of `values` per group id (0..n_groups-1); NaN for an empty group."""
    sums = values.new_zeros(n_groups).index_add_(0, groups, values)
    return sums / values.new_zeros(n_groups).index_add_(0, groups, torch.ones_like(values))


QUESTION_READ_BLOCKS = 2  # QuestionHead reads the answer position after this many scheduled blocks


class QuestionHead(torch.nn.Module):
    """A throw-away read-out (never exported) of the hidden state where an answer is predicted, after the
    first `QUESTION_READ_BLOCKS` scheduled blocks: the colour the question names (0 for none). A yes/no
    answer compares that word with the image, but answer tokens alone give no gradient towards bringing
    it there: in an earlier default without this head, the colour a yes/no question named read 0.20 at
    that position after every block (chance 0.10) while the image's colour read 0.83-1.00, and yes/no
    stayed at chance. Like the vision stage's dense labels, it gives the decoder a target for a step it
    needs. A second read-out there, the mark's colour on detail questions, does the same for the colour
    that block's route (:func:`route_loss`) brings from the mark's tokens."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.color = torch.nn.Linear(d_model, 1 + len(synthetic.COLORS))
        self.mark = torch.nn.Linear(d_model, 1 + len(synthetic.COLORS))

    def loss(self, hidden: Tensor, named: Tensor) -> Tensor:
        """hidden [Q, D] at the answer positions, named [Q] -> cross-entropy."""
        return torch.nn.functional.cross_entropy(self.color(hidden), named)

    def mark_loss(self, hidden: Tensor, asked: Tensor) -> Tensor:
        """hidden [Q, D] at the answer positions, asked [Q] -> cross-entropy over the detail questions
        (asked > 0; at least one)."""
        detail = asked > 0
        return torch.nn.functional.cross_entropy(self.mark(hidden[detail]), asked[detail])


def route_loss(model: MolmoeForCausalLM, block: int, x: Tensor, rope, batch: Batch) -> Tensor:
    """How far `block`'s heads are from looking, from each position that writes a reading answer's digit, at
    that digit's glyph tokens: per (position, head), -log of the attention mass on them, averaged. A decoder
    trained on answers alone never learned to find the glyph to read (its answers stayed stock numbers while
    the vision tokens named the glyphs); with this target, one block learns where each digit is and the
    answer loss can teach what to read there (docs/embedded-default.md)."""
    rows, at = batch.route_at.unbind(-1)
    q, k, _ = model.model.transformer.blocks[block].attn.project(x, rope)  # [B, heads, L, head_dim]
    scores = torch.einsum("ghd,ghld->ghl", q[rows, :, at], k[rows]) / q.shape[-1] ** 0.5
    visible = batch.attention_mask()[rows, 0, at]  # [G, L]
    target = torch.zeros_like(visible).scatter_(1, batch.route_keys.clamp(min=0), batch.route_keys >= 0)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    on_glyph = scores.masked_fill(~target[:, None], float("-inf"))
    return (scores.logsumexp(-1) - on_glyph.logsumexp(-1)).mean()


def batch_losses(
    model: MolmoeForCausalLM, batch: Batch, schedule: LayerSchedule, question_head: QuestionHead | None = None
) -> dict[str, Tensor]:
    """The losses of a batch under `schedule`: "answer", the cross-entropy of the answer tokens, averaged per
    question, then over the questions (each counts once, whatever its length); "question", the question
    read-out's loss, when `question_head` is given, and "mark", its mark read-out's, when the batch also has
    detail questions; "route" (:func:`route_loss` of the second scheduled block), when the batch has reading
    or detail answers."""
    features = model.encode_images(batch.crops, batch.crop_masks)  # [sum crops, tokens, D]
    per_sample = features.split(batch.crops_per_sample)
    padded = features.new_zeros(len(per_sample), batch.image_input_idx.shape[1], *features.shape[1:])
    for b, f in enumerate(per_sample):
        padded[b, : f.shape[0]] = f
    x = model.embed(batch.input_ids, padded, batch.image_input_idx)
    rope = model.rope(batch.positions)
    mask = batch.attention_mask()
    early: list[Tensor] = []  # the outputs of the first QUESTION_READ_BLOCKS scheduled blocks
    hidden = x
    for layer in schedule.layers[:QUESTION_READ_BLOCKS]:
        hidden = model.run_blocks(hidden, rope, [layer], schedule.renormalize, mask=mask)
        early.append(hidden)
    hidden = model.run_blocks(hidden, rope, schedule.layers[QUESTION_READ_BLOCKS:], schedule.renormalize, mask=mask)
    target = batch.labels >= 0
    logits = model.logits(model.final_norm(hidden[target])).float()
    token_loss = torch.nn.functional.cross_entropy(logits, batch.labels[target], reduction="none")
    losses = {"answer": group_mean(token_loss, batch.label_question[target], len(batch.answer_at)).mean()}
    if question_head is not None:
        rows, positions = batch.answer_at.unbind(-1)
        losses["question"] = question_head.loss(early[-1][rows, positions], batch.named)
        if (batch.asked > 0).any():
            losses["mark"] = question_head.mark_loss(early[-1][rows, positions], batch.asked)
    if len(batch.route_at):
        losses["route"] = route_loss(model, schedule.layers[1][0], early[0], rope, batch)
    return losses


# ----------------------------------------------------------------------------------------------------
# Vision stage: the encoder learns the scenes before the decoder learns to talk about them
# ----------------------------------------------------------------------------------------------------

VISION_QTYPES = ("color", "shape", "count", "yesno")  # the scenes with shapes (reading scenes have none)
MAX_COUNT = 6


@dataclass
class VisionBatch(TensorFields):
    """Views and their labels (-1 where a label does not apply): global views of shape scenes, then crops of
    sign sheets (`synthetic.sign_sheet`)."""

    crops: Tensor  # [B, patches, patch_dim]: each view exactly as the processor makes it
    masks: Tensor  # [B, patches]: share of real (not padding) pixels per patch
    kinds: Tensor  # [B, tokens]: shape kind under each pooled token (0 background)
    colors: Tensor  # [B, tokens]: colour under each pooled token (0 background)
    digits: Tensor  # [B, tokens]: digit under each pooled token, -1 where there is none
    places: Tensor  # [B, tokens]: that digit's place in its number, -1 where there is none
    counts: Tensor  # [B]: number of shapes - 1
    shape: Tensor  # [B]: the single object's kind, or -1
    color: Tensor  # [B]: the single object's colour, or -1


@dataclass(frozen=True)
class VisionItem:
    """One view and its labels, the patches in fp16. A shape scene's view is `preprocess_image`'s global view,
    a sign sheet's is one crop. The mask is the view's own real-pixel share: the processor pairs the global
    view with the first tile's mask (the original's shift), which depends on the tier this stage has no
    tier for."""

    crop: np.ndarray
    mask: np.ndarray
    labels: synthetic.ViewLabels
    count: int
    shape: int
    color: int


def vision_item(cfg: VisionPreprocessConfig, scene: synthetic.Scene, image: Image.Image) -> VisionItem:
    """`image` is `synthetic.render(scene)`, passed in where it is already drawn."""
    size, patch = cfg.base_image_input_size, cfg.image_patch_size
    pixels, real = resize_and_pad(to_rgb_array(image), size, cfg)
    shapes = scene.shapes
    single = shapes[0] if len(shapes) == 1 else None
    return VisionItem(
        crop=patchify(pixels, patch).astype(np.float16),
        mask=patchify(real[..., None].astype(np.float32), patch).mean(axis=-1),
        labels=synthetic.view_labels(scene, size, 2 * patch),  # a token = 2x2 patches
        count=len(shapes) - 1 if shapes else -1,
        shape=synthetic.SHAPES.index(single.kind) if single else -1,
        color=list(synthetic.COLORS).index(single.color) if single else -1,
    )


def vision_batch(items: list[VisionItem]) -> VisionBatch:
    def dense(name: str) -> Tensor:
        return torch.from_numpy(np.stack([getattr(i.labels, name).ravel() for i in items]))

    def glyph_only(labels: Tensor) -> Tensor:
        """Digit read-outs train on glyph tokens only: they are a minority of the tokens even on a sign sheet,
        and background, which the kind and colour labels already mark, would dominate the loss."""
        return torch.where(labels > 0, labels - 1, -1)

    return VisionBatch(
        crops=torch.from_numpy(np.stack([i.crop for i in items])).float(),
        masks=torch.from_numpy(np.stack([i.mask for i in items])),
        kinds=dense("kinds"),
        colors=dense("colors"),
        digits=glyph_only(dense("digits")),
        places=glyph_only(dense("places")),
        counts=torch.tensor([i.count for i in items]),
        shape=torch.tensor([i.shape for i in items]),
        color=torch.tensor([i.color for i in items]),
    )


def vision_sample(seed: int, index: int) -> synthetic.Sample:
    """The `index`-th vision-stage shape scene: the shape question types in turn, from the training split's
    own sample streams, past the ones the decoder stage reads (`train_sample` uses cycles from 0)."""
    cycle, slot = divmod(index, len(VISION_QTYPES))
    return synthetic.make_sample("train", seed, VISION_QTYPES[slot], 10**7 + cycle)


def sheet_scene(space: KnobSpace, seed: int, index: int) -> synthetic.Scene:
    """The `index`-th vision-stage sign sheet, at a tier drawn from the plan space's."""
    rng = random.Random(f"sheet/{seed}/{index}")
    return synthetic.sign_sheet(rng, rng.choice(space.tiers))


SCENE_READOUTS = ("kind", "color", "digit", "place", "count", "shape", "object_color")


class SceneHeads(torch.nn.Module):
    """Throw-away linear read-outs of the vision tokens [B, T, d_model] (never exported): per token the
    shape kind and colour under it and a sign's digit and its place in the number, per image the count
    (mean over tokens) and the single object's shape and colour (attention-pooled with a learned query
    each)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.kind = torch.nn.Linear(d_model, 1 + len(synthetic.SHAPES))
        self.color = torch.nn.Linear(d_model, 1 + len(synthetic.COLORS))
        self.digit = torch.nn.Linear(d_model, len(synthetic.GLYPHS))
        self.place = torch.nn.Linear(d_model, synthetic.READ_DIGITS[1])
        self.count = torch.nn.Linear(d_model, MAX_COUNT)
        self.shape = torch.nn.Linear(d_model, len(synthetic.SHAPES))
        self.object_color = torch.nn.Linear(d_model, len(synthetic.COLORS))
        self.queries = torch.nn.Parameter(torch.zeros(2, d_model))

    def forward(self, tokens: Tensor, batch: VisionBatch) -> dict[str, tuple[Tensor, Tensor]]:
        """(logits [N, classes], targets [N]) per read-out; targets -1 are ignored."""
        d = tokens.shape[-1]
        attn = torch.softmax(tokens @ self.queries.T / d**0.5, dim=1)  # [B, T, 2]
        pooled = torch.einsum("btq,btd->qbd", attn, tokens)
        return {
            "kind": (self.kind(tokens).flatten(0, 1), batch.kinds.flatten()),
            "color": (self.color(tokens).flatten(0, 1), batch.colors.flatten()),
            "digit": (self.digit(tokens).flatten(0, 1), batch.digits.flatten()),
            "place": (self.place(tokens).flatten(0, 1), batch.places.flatten()),
            "count": (self.count(tokens.mean(dim=1)), batch.counts),
            "shape": (self.shape(pooled[0]), batch.shape),
            "object_color": (self.object_color(pooled[1]), batch.color),
        }


def vision_losses(model: MolmoeForCausalLM, heads: SceneHeads, batch: VisionBatch) -> tuple[Tensor, dict[str, float]]:
    """Sum of the read-outs' cross-entropies, and each read-out's accuracy on the batch (a monitor)."""
    tokens = model.encode_images(batch.crops, batch.masks)
    total, accuracy = tokens.new_zeros(()), {}
    for name, (logits, target) in heads(tokens, batch).items():
        valid = target >= 0
        if valid.any():
            total = total + torch.nn.functional.cross_entropy(logits[valid], target[valid])
            accuracy[name] = float((logits[valid].argmax(-1) == target[valid]).float().mean())
    return total, accuracy


class VisionStream(torch.utils.data.IterableDataset):
    """(step, VisionBatch) for vision steps start..cfg.vision_steps-1, in a loader worker."""

    def __init__(self, folder: Path, cfg: PretrainConfig, start: int) -> None:
        self.folder, self.cfg, self.start = folder, cfg, start

    def __iter__(self) -> Iterator[tuple[int, VisionBatch]]:
        """The reading steps see sign sheets only; then shape scenes cycle through a pool of `cfg.vision_pool`,
        each prepared once (resizing dominates the cost), beside fresh sign sheets."""
        torch.set_num_threads(1)
        vision = MolmoeProcessor.from_pretrained(self.folder).vision
        space = KnobSpace.from_config(MolmoeConfig.from_folder(self.folder))
        cfg, prepared = self.cfg, {}
        for step in range(self.start, cfg.vision_steps):
            indices, sheets = self.views(step)
            for i in indices:
                if i not in prepared:
                    sample = vision_sample(cfg.seed, i)
                    prepared[i] = vision_item(vision, sample.scene, sample.image)
            sheet_scenes = [sheet_scene(space, cfg.seed, i) for i in sheets]
            sheet_items = [vision_item(vision, scene, synthetic.render(scene)) for scene in sheet_scenes]
            yield step, vision_batch([prepared[i] for i in indices] + sheet_items)

    def views(self, step: int) -> tuple[list[int], range]:
        """(shape-scene pool indices, sign-sheet indices) of a vision step; no sheet is seen twice. Three phases:
        sheets only, then shape views beside fewer sheets, then (sharpening the glyphs the decoder will read)
        sheets beside fewer shape views."""
        cfg = self.cfg
        many, few = cfg.vision_batch_size, cfg.vision_sheets
        mixed_end = cfg.vision_steps - cfg.vision_sharpen_steps
        read = min(step, cfg.vision_read_steps)
        mixed = min(max(0, step - cfg.vision_read_steps), mixed_end - cfg.vision_read_steps)
        sharpen = max(0, step - mixed_end)
        first_sheet = read * many + mixed * few + sharpen * many
        if step < cfg.vision_read_steps:
            return [], range(first_sheet, first_sheet + many)
        n_shapes, n_sheets = (few, many) if step >= mixed_end else (many, few)
        first_shape = mixed * many + sharpen * few
        indices = [(first_shape + i) % cfg.vision_pool for i in range(n_shapes)]
        return indices, range(first_sheet, first_sheet + n_sheets)


# ----------------------------------------------------------------------------------------------------
# Validation: greedy answers at the full decoder, per tier and question type
# ----------------------------------------------------------------------------------------------------


def validation_samples(seed: int, n: int, mix: tuple[str, ...] = TRAIN_MIX) -> list[synthetic.Sample]:
    """The suite's question types, then any other type of `mix`, in turn."""
    return synthetic.generate(
        "validation", n, seed, synthetic.QTYPES + tuple(q for q in mix if q not in synthetic.QTYPES)
    )


def evaluate(runtime: AdaptiveMolmoe, samples: list[synthetic.Sample]) -> dict[tuple[int, str], float]:
    """Exact-match accuracy (lowercased, stripped) per (max_crops, qtype) at the full decoder. A quick
    training monitor; the reported accuracies come from lmms-eval's own scorers (`profile`)."""
    gen = GenerationConfig(max_new_tokens=8)
    hits: dict[tuple[int, str], list[bool]] = {}
    for tier in runtime.knobs.tiers:
        plan = runtime.knobs.full_plan(tier)
        for s in samples:
            out = runtime.generate(s.question + POST_PROMPT, [s.image], plan, gen)
            hits.setdefault((tier, s.qtype), []).append(out.text.strip().lower() == s.answer)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}


# ----------------------------------------------------------------------------------------------------
# State, logs, export
# ----------------------------------------------------------------------------------------------------


class RunDir:
    """OUT_DIR of a training run: the initial random checkpoint, resumable state and logs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.init = root / "init"
        self.state = root / "state.pt"
        self.metrics = root / "metrics.csv"
        self.vision_metrics = root / "vision_metrics.csv"
        self.eval = root / "eval.csv"
        self.checkpoint = root / "checkpoint"
        self.config = root / "pretrain_config.json"

    def prepare(self, cfg: PretrainConfig) -> None:
        """Create the run, or check that an existing one was started with the same config. The run starts from
        a random tiny model, or from a copy of the checkpoint `cfg.init` names."""
        self.root.mkdir(parents=True, exist_ok=True)
        check_settings(self.config, asdict(cfg))
        if (self.init / "model.safetensors").is_file():
            return
        if not cfg.init:
            build_tiny(self.init, seed=cfg.seed)
            return
        self.init.mkdir(exist_ok=True)
        for f in sorted(Path(cfg.init).iterdir()):
            if f.is_file() and f.name != "model.safetensors":
                (self.init / f.name).write_bytes(f.read_bytes())
        (self.init / "model.safetensors").write_bytes((Path(cfg.init) / "model.safetensors").read_bytes())

    def save_state(self, modules: dict[str, torch.nn.Module | torch.optim.Optimizer], step: int) -> None:
        """`step` counts vision steps, then decoder steps: vision_steps + n after n decoder steps."""
        save_atomic({"step": step, **{name: m.state_dict() for name, m in modules.items()}}, self.state)

    def load_state(self, modules: dict[str, torch.nn.Module | torch.optim.Optimizer], vision_steps: int) -> int:
        """Restore the last saved step (0 if none) and drop log rows written after it (all of them without one)."""
        step = 0
        if self.state.is_file():
            state = torch.load(self.state, map_location="cpu", weights_only=True)
            for name, m in modules.items():
                m.load_state_dict(state[name])
            step = int(state["step"])
            log.info("resuming %s at step %d", self.root, step)
        truncate_csv(self.vision_metrics, step)
        for path in (self.metrics, self.eval):
            truncate_csv(path, step - vision_steps)
        return step


def export(model: MolmoeForCausalLM, init: Path, out: Path) -> Path:
    """The trained model as a checkpoint folder: the init folder's config/tokenizer files + bf16 weights."""
    out.mkdir(parents=True, exist_ok=True)
    for f in init.glob("*.json"):
        (out / f.name).write_bytes(f.read_bytes())
    save_weights(model, out, torch.bfloat16)
    return out


def plot_curves(run: RunDir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run.metrics)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    losses = [float(r["loss"]) for r in rows]
    plot_with_mean(ax_loss, [int(r["step"]) for r in rows], losses, max(1, len(losses) // 50), label="loss")
    ax_loss.set(xlabel="step", ylabel="answer cross-entropy", yscale="log", title="training loss")
    if run.eval.is_file():
        evals = read_rows(run.eval)
        for key in sorted({(int(r["max_crops"]), r["qtype"]) for r in evals}):
            pts = [(int(r["step"]), float(r["accuracy"])) for r in evals if (int(r["max_crops"]), r["qtype"]) == key]
            ax_acc.plot(*zip(*pts, strict=True), marker="o", label=f"{key[1]} @ {key[0]} crops")
        ax_acc.set(xlabel="step", ylabel="exact match", title="validation, full decoder", ylim=(0, 1))
        ax_acc.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = run.root / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------


def train_vision(
    run: RunDir, cfg: PretrainConfig, model: MolmoeForCausalLM, heads: SceneHeads, optimizer, save, start: int
) -> None:
    """Vision steps start..cfg.vision_steps-1 (the decoder's weights get no gradient)."""
    device = model.lm_head.weight.device
    stream = VisionStream(run.init, cfg, start)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
    began = time.perf_counter()
    bar = progress(loader, total=cfg.vision_steps, initial=start, desc="pretrain (vision)", unit="step")
    for step, batch in bar:
        lr = cfg.vision_lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, accuracy = vision_losses(model, heads, batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], cfg.grad_clip)
        optimizer.step()
        row = {"step": step, "loss": round(float(loss.detach()), 5), "lr": lr,
               **{f"acc_{k}": round(v, 4) for k, v in accuracy.items()}, "seconds": round(time.perf_counter() - began, 2)}  # fmt: skip
        write_rows(run.vision_metrics, [row], ["step", "loss", "lr", *(f"acc_{k}" for k in SCENE_READOUTS), "seconds"])
        bar.set_postfix(loss=f"{row['loss']:.3f}", shape=accuracy.get("shape", float("nan")), refresh=False)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.vision_steps:
            save(step + 1)


def train(out: Path, cfg: PretrainConfig, device: str = "cpu") -> Path:
    """Train (or resume) the run in `out` on `device` (fp32); returns the exported checkpoint folder. One
    process at a time per run folder: a second one is refused (`runlog.FolderInUse`)."""
    with exclusive(out, "pretrain"):
        return _train(RunDir(out), cfg, device)


def _train(run: RunDir, cfg: PretrainConfig, device: str) -> Path:
    torch.manual_seed(cfg.seed)
    run.prepare(cfg)
    model = load_model(run.init, torch.device(device), torch.float32).requires_grad_(True).train()
    heads = SceneHeads(model.config.d_model).to(device)
    question_head = QuestionHead(model.config.d_model).to(device)
    vision = list(model.model.vision_backbone.parameters())
    vision_ids = {id(p) for p in vision}
    decoder = [p for p in model.parameters() if id(p) not in vision_ids] + list(question_head.parameters())
    adamw = {"weight_decay": cfg.weight_decay, "betas": (0.9, 0.95)}
    vision_optimizer = torch.optim.AdamW([{"params": vision + list(heads.parameters())}], lr=cfg.vision_lr, **adamw)
    groups = [{"params": decoder, "scale": 1.0}]
    if cfg.vision_lr_scale > 0:
        groups.append({"params": vision, "scale": cfg.vision_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **adamw)
    trained = [p for group in groups for p in group["params"]]  # a frozen backbone keeps its last vision grads
    modules = {
        "model": model, "heads": heads, "question_head": question_head,
        "vision_optimizer": vision_optimizer, "optimizer": optimizer,
    }  # fmt: skip
    start = run.load_state(modules, cfg.vision_steps)

    def save(step: int) -> None:
        run.save_state(modules, step)

    if start < cfg.vision_steps:
        train_vision(run, cfg, model, heads, vision_optimizer, save, start)
    start = max(0, start - cfg.vision_steps)
    # vision_lr_scale 0 freezes the backbone: a decoder read-out follows glyph features only while they hold still
    model.model.vision_backbone.requires_grad_(cfg.vision_lr_scale > 0)
    runtime = AdaptiveMolmoe(model, MolmoeProcessor.from_pretrained(run.init))
    val = validation_samples(cfg.seed, cfg.eval_samples, cfg.train_mix)

    loader = torch.utils.data.DataLoader(
        StepStream(run.init, cfg, start), batch_size=None, num_workers=1, prefetch_factor=4
    )
    began = time.perf_counter()
    bar = progress(loader, total=cfg.steps, initial=start, desc="pretrain", unit="step")
    for step, plan, batch in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step) * group["scale"]
        losses = batch_losses(model, batch.to(model.lm_head.weight.device), plan.schedule, question_head)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        value = float(losses["answer"].detach())
        row = {
            "step": step, "loss": round(value, 5), "question_loss": round(float(losses["question"].detach()), 5),
            "route_loss": round(float(losses["route"].detach()), 5) if "route" in losses else "",
            "mark_loss": round(float(losses["mark"].detach()), 5) if "mark" in losses else "",
            "lr": cfg.lr_at(step), "max_crops": plan.max_crops,
            "top_k": plan.schedule.layers[-1][1], "n_blocks": len(plan.schedule.layers),
            "answer_tokens": batch.n_answer_tokens, "seconds": round(time.perf_counter() - began, 2),
        }  # fmt: skip
        write_rows(run.metrics, [row], list(row))
        bar.set_postfix(loss=f"{value:.3f}", crops=plan.max_crops, refresh=False)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            accuracy = evaluate(runtime, val)
            model.train()
            rows = [
                {"step": step, "max_crops": c, "qtype": q, "accuracy": round(a, 4)} for (c, q), a in accuracy.items()
            ]
            write_rows(run.eval, rows, list(rows[0]))
            log.info("step %d validation: %s", done, {f"{q}@{c}": round(a, 2) for (c, q), a in accuracy.items()})
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(cfg.vision_steps + done)
    model.eval()
    folder = export(model, run.init, run.checkpoint)
    log.info("trained checkpoint: %s; curves: %s", folder, plot_curves(run))
    return folder


SETTING_HELP = {
    "steps": "decoder-stage steps",
    "batch_size": "images per decoder step",
    "questions_per_image": "questions per image row: its own and up to this many - 1 more about its scene",
    "lr": "peak learning rate of the decoder stage",
    "min_lr_ratio": "the cosine decay's floor, relative to the peak learning rate",
    "warmup_steps": "linear warm-up steps of each stage",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient norm clip",
    "full_plan_prob": "share of decoder steps at the full decoder, any tier",
    "vision_steps": "vision-stage steps before the decoder steps",
    "vision_read_steps": "the first vision steps, on sign-sheet crops only",
    "vision_sharpen_steps": "the last vision steps, with more sign sheets than shape views",
    "vision_batch_size": "views per vision step",
    "vision_sheets": "sign-sheet crops per vision step between the reading and sharpening phases, on top",
    "vision_lr": "peak learning rate of the vision stage",
    "vision_pool": "distinct vision-stage scenes, reused in turn",
    "vision_lr_scale": "the vision backbone's learning rate in the decoder stage, relative to --lr (0: frozen)",
    "seed": "seed of the initial weights, the plans and the samples",
    "eval_every": "decoder steps between validations",
    "eval_samples": "validation samples per validation, each run at every tier",
    "save_every": "steps between saved states (the resume points)",
    "mix": "question types the decoder steps cycle through, comma-separated (e.g. add detail)",
    "detail_every": "every N-th decoder step sees detail images only, at the top tier (0: none)",
    "init": "checkpoint folder to fine-tune (its config and tokenizer are kept); empty: from scratch",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m lmms_adaptive.default.pretrain",
        description=__doc__.split("\n\n")[0],
        epilog="Re-running with the same OUT_DIR and flags resumes from the last saved step.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out", type=Path, help="run folder (state, logs, and checkpoint/ at the end)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; not part of the run's identity")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the training process (the data worker needs another core, and spinning OpenMP "
        "threads on a busy CPU cost several times the speed); not part of the run's identity",
    )  # fmt: skip
    for f in fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                            help=SETTING_HELP[f.name])  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    torch.set_num_threads(args.threads)
    folder = train(args.out, cfg, args.device)
    log.info("pretrain: %d vision + %d decoder steps; checkpoint %s, logs and curves in %s; took %s",
             cfg.vision_steps, cfg.steps, folder, args.out, took(started))  # fmt: skip
    print(folder)


if __name__ == "__main__":
    main()
