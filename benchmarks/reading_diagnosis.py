"""Where a model's reading pathway loses the digits, per tier: a diagnosis of the embedded default, not a timing.

    python benchmarks/reading_diagnosis.py --json /tmp/reading.json      # the shipped default, ~3 min on 2 cores
    python benchmarks/reading_diagnosis.py --checkpoint DIR --tiers 12 --samples 20 --train-samples 100

A reading question ("What number is written on the sign?") takes three steps: the vision tokens under each
glyph must name it, the position that writes each digit must attend to that glyph, and what it reads there
must reach the output. For each tier this measures each step on validation-split reading samples at the
full plan:

- exact, digits: the greedy answer's exact match, and the share of digits right place by place;
- tokens_per_glyph: image tokens whose pixels change when the glyph is erased (`synthetic.erase_glyph`);
- attention (attention_block, attention_head): the largest mean attention mass that one head puts from the
  positions that write the digits onto the sign's glyph tokens, and which head; uniform: the glyph tokens'
  share of the image tokens, what attention spread evenly would give;
- token_probe: digit accuracy of a linear probe on the vision feature of each token that one glyph owns
  (more than `GLYPH_OWNED` of the token's change comes from erasing that glyph: its majority glyph);
- glyph_probe: the same on the mean feature of each glyph's tokens, what a decoder that attends to exactly
  that glyph could read off linearly.

The probes train on train-split reading samples (full batch, standardised features) and are scored on the
validation ones; chance is 0.1 for both.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from knob_latency import write_rows_json
from tqdm import tqdm

from lmms_adaptive.core.checkpoint import default_checkpoint, load_model
from lmms_adaptive.core.model import LayerSchedule, MolmoeForCausalLM
from lmms_adaptive.core.processor import MolmoeProcessor, ProcessedRequest
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig
from lmms_adaptive.default import synthetic
from lmms_adaptive.default.pretrain import POST_PROMPT, GlyphTokens, collate, glyph_tokens, image_questions

log = logging.getLogger("reading_diagnosis")


@dataclass
class Row:
    checkpoint: str
    max_crops: int
    samples: int
    train_samples: int
    exact: float
    digits: float
    tokens_per_glyph: float
    uniform: float
    attention: float
    attention_block: int
    attention_head: int
    token_probe: float
    glyph_probe: float


def answer_attention(model: MolmoeForCausalLM, processor: MolmoeProcessor, sample: synthetic.Sample, max_crops: int):
    """(GlyphTokens, the request's vision features [crops, tokens, D], and the [blocks, heads] attention mass on
    the glyph tokens averaged over the positions that write the digits: teacher-forced, the prompt, then the
    right answer)."""
    eos, pad = processor.special.eos, processor.tokenizer.token_to_id("<|padding|>")
    item = image_questions(processor, sample, [(sample.question, sample.answer, "read")], max_crops, eos)
    glyphs = item.glyphs
    batch = collate([item], pad)
    (_, at), = batch.answer_at.tolist()  # fmt: skip
    queries = torch.arange(at + 1, at + 1 + len(sample.answer))  # the prompt's last token writes the space
    keys = torch.from_numpy(glyphs.positions(glyphs.touched()))
    features = model.encode_images(batch.crops, batch.crop_masks)
    x = model.embed(batch.input_ids, features[None], batch.image_input_idx)
    rope, mask = model.rope(batch.positions), batch.attention_mask()[0, 0, queries]
    mass = torch.zeros(model.config.n_layers, model.config.n_heads)

    full = LayerSchedule.full(model.config)
    for index, top_k in full.layers:
        q, k, _ = model.model.transformer.blocks[index].attn.project(x, rope)
        scores = q[0][:, queries] @ k[0].transpose(-1, -2) / q.shape[-1] ** 0.5  # [heads, queries, positions]
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        mass[index] = weights[..., keys].sum(-1).mean(-1)
        x = model.run_blocks(x, rope, [(index, top_k)], full.renormalize, mask=batch.attention_mask())
    return glyphs, features, mass


def encode(model: MolmoeForCausalLM, request: ProcessedRequest) -> torch.Tensor:
    return model.encode_images(torch.from_numpy(request.images), torch.from_numpy(request.image_masks))


def glyph_features(features: torch.Tensor, glyphs: GlyphTokens, answer: str):
    """(token features, their digits, per-glyph mean features, their digits) of one request, from its vision
    features [crops, tokens, D]."""
    token_x, token_y, glyph_x, glyph_y = [], [], [], []
    for place, digit in enumerate(answer):
        owned = features[torch.from_numpy(glyphs.owned(place))]
        if len(owned):
            token_x.append(owned)
            token_y += [int(digit)] * len(owned)
            glyph_x.append(owned.mean(0, keepdim=True))
            glyph_y.append(int(digit))
    return token_x, token_y, glyph_x, glyph_y


def probe_accuracy(train: tuple[list, list], test: tuple[list, list], steps: int = 500) -> float:
    """Test accuracy of a linear digit probe fitted full batch on standardised train features (NaN if empty)."""
    if not train[0] or not test[0]:
        return float("nan")
    x, y = torch.cat(train[0]).float(), torch.tensor(train[1])
    mean, std = x.mean(0), x.std(0) + 1e-5
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(synthetic.GLYPHS))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = linear((torch.cat(test[0]).float() - mean) / std).argmax(-1)
    return float((predicted == torch.tensor(test[1])).float().mean())


@torch.no_grad()
def diagnose(runtime: AdaptiveMolmoe, folder: Path, tier: int, samples: int, train_samples: int, seed: int) -> Row:
    model, processor = runtime.model, runtime.processor
    plan, gen = runtime.knobs.full_plan(tier), GenerationConfig(max_new_tokens=6)
    probe_train: list[list] = [[], [], [], []]
    for s in tqdm(synthetic.generate("train", train_samples, seed, ("read",)), desc=f"probe data, {tier} crops"):
        request = processor(s.question + POST_PROMPT, [s.image], max_crops=tier)
        glyphs = glyph_tokens(processor, s, request, tier)
        for column, values in zip(probe_train, glyph_features(encode(model, request), glyphs, s.answer)):
            column += values
    probe_test: list[list] = [[], [], [], []]
    exact, digits, per_glyph, uniform, mass = [], [], [], [], 0
    for s in tqdm(synthetic.generate("validation", samples, seed, ("read",)), desc=f"validation, {tier} crops"):
        answer = runtime.generate(s.question + POST_PROMPT, [s.image], plan, gen).text.strip()
        exact.append(answer == s.answer)
        digits += [a == b for a, b in zip(answer.ljust(len(s.answer)), s.answer)]
        glyphs, features, sample_mass = answer_attention(model, processor, s, tier)
        mass = mass + sample_mass / samples
        per_glyph += [int(glyphs.owned(p).sum()) for p in range(len(s.answer))]
        uniform.append(len(glyphs.positions(glyphs.touched())) / glyphs.request.n_image_tokens)
        for column, values in zip(probe_test, glyph_features(features, glyphs, s.answer)):
            column += values
    block, head = divmod(int(mass.argmax()), mass.shape[1])
    with torch.enable_grad():
        token_probe = probe_accuracy(probe_train[:2], probe_test[:2])
        glyph_probe = probe_accuracy(probe_train[2:], probe_test[2:])
    return Row(
        checkpoint=str(folder), max_crops=tier, samples=samples, train_samples=train_samples,
        exact=round(float(np.mean(exact)), 3), digits=round(float(np.mean(digits)), 3),
        tokens_per_glyph=round(float(np.mean(per_glyph)), 2), uniform=round(float(np.mean(uniform)), 4),
        attention=round(float(mass.max()), 3), attention_block=block, attention_head=head,
        token_probe=round(token_probe, 3), glyph_probe=round(glyph_probe, 3),
    )  # fmt: skip


def print_table(rows: list[Row]) -> None:
    columns = [k for k in asdict(rows[0]) if k != "checkpoint"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(getattr(row, c)) for c in columns))


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(
        prog="python benchmarks/reading_diagnosis.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )  # fmt: skip
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the shipped default)")
    p.add_argument("--tiers", default="3,6,12", help="max_crops values, comma-separated (default 3,6,12)")
    p.add_argument("--samples", type=int, default=40, help="validation reading samples per tier (default 40)")
    p.add_argument("--train-samples", type=int, default=200, help="train reading samples for the probes (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic samples (default 0)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as a JSON list here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tiers = [int(t) for t in args.tiers.split(",")]
    except ValueError:
        p.error(f"--tiers must be integers like 3,6,12, got {args.tiers!r}")
    if args.samples < 1 or args.train_samples < 1:
        p.error("--samples and --train-samples must be >= 1")
    folder = args.checkpoint or default_checkpoint()
    runtime = AdaptiveMolmoe(load_model(folder), MolmoeProcessor.from_pretrained(folder))
    rows = [diagnose(runtime, folder, tier, args.samples, args.train_samples, args.seed) for tier in tiers]
    print_table(rows)
    if args.json:
        write_rows_json(args.json, rows)
        log.info("wrote %s", args.json)
    return rows


if __name__ == "__main__":
    main()
