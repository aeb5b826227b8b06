"""Elastic pretraining of the tiny default: plans, batches, the loss going down, and exact resumption."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmms_adaptive.core.checkpoint import load_model
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.plan import KnobSpace
from lmms_adaptive.core.processor import MolmoeProcessor
from lmms_adaptive.default import pretrain, synthetic
from lmms_adaptive.tools.runlog import read_rows, write_rows

QUICK = pretrain.PretrainConfig(
    steps=6,
    batch_size=2,
    lr=3e-3,
    warmup_steps=2,
    eval_every=1000,
    eval_samples=1,
    save_every=3,
    vision_steps=4,
    vision_read_steps=1,
    vision_sharpen_steps=1,
    vision_batch_size=2,
    vision_sheets=1,
    vision_pool=6,
)


@pytest.fixture(scope="module")
def knobs(tiny_dir: Path) -> KnobSpace:
    return KnobSpace.from_config(MolmoeConfig.from_folder(tiny_dir))


def test_step_plans_are_valid_points_of_the_plan_space(knobs: KnobSpace) -> None:
    seen_tiers, seen_k, seen_blocks = set(), set(), set()
    for step in range(200):
        plan = pretrain.sample_step_plan(knobs, seed=0, step=step, full_plan_prob=0.25)
        blocks = plan.schedule.blocks
        assert plan.max_crops in knobs.tiers
        assert blocks[0] == 0 and list(blocks) == sorted(set(blocks))  # block 0 always runs, in order
        assert len(blocks) in knobs.block_options(1)
        assert plan.schedule.layers[0] == (0, knobs.model_top_k)  # as at inference: insertion after block 0
        assert len({k for _, k in plan.schedule.layers[1:]}) == 1
        seen_tiers.add(plan.max_crops)
        seen_k.add(plan.schedule.layers[-1][1])
        seen_blocks.add(len(blocks))
    assert seen_tiers == set(knobs.tiers) and seen_k == set(knobs.top_k_options)
    assert seen_blocks == set(knobs.block_options(1))
    assert pretrain.sample_step_plan(knobs, 0, 7, 0.25) == pretrain.sample_step_plan(knobs, 0, 7, 0.25)


def test_training_samples_follow_the_mix_deterministically() -> None:
    qtypes = [pretrain.train_sample(0, i).qtype for i in range(2 * len(pretrain.TRAIN_MIX))]
    assert qtypes == list(pretrain.TRAIN_MIX) * 2
    n = len(pretrain.TRAIN_MIX)
    counts = [pretrain.train_sample(0, i) for i in range(2 * n) if pretrain.TRAIN_MIX[i % n] == "count"]
    assert len({s.sample_id for s in counts}) == len(counts) == 4  # the two count slots never repeat a sample
    assert pretrain.train_sample(0, 5).sample_id == pretrain.train_sample(0, 5).sample_id
    assert all(pretrain.train_sample(0, i).sample_id.startswith("synth-train") for i in range(n))


def _image_questions(tiny_dir: Path, n_questions: int, index: int = 2):
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    sample = pretrain.train_sample(3, index)
    qas = pretrain.sample_questions(sample, random.Random(0), n_questions)
    eos = processor.special.eos
    return processor, qas, pretrain.image_questions(processor, sample, qas, 3, eos)


def test_collate_puts_each_questions_labels_on_its_answer_tokens(tiny_dir: Path) -> None:
    processor, qas, item = _image_questions(tiny_dir, 3)
    assert len(qas) == 3 and len(item.segments) == 3
    pad = processor.tokenizer.token_to_id("<|padding|>")
    batch = pretrain.collate([item, item], pad)
    ids, labels, positions, segments = (
        t[0].tolist() for t in (batch.input_ids, batch.labels, batch.positions, batch.segments)
    )
    n = len(item.prefix)
    assert ids[:n] == item.prefix.tolist() and set(segments[:n]) == {0} and positions[:n] == list(range(n))
    start = n
    text_question = [q for q, _, _ in qas]
    for s, ((prompt, answer), (_, text, _)) in enumerate(zip(item.segments, qas, strict=True), start=1):
        end = start + len(prompt) + len(answer)
        assert ids[start:end] == prompt + answer and set(segments[start:end]) == {s}
        assert positions[start:end] == list(range(n, n + end - start))  # each question right after the image
        assert labels[start + len(prompt) - 1 : end - 1] == answer  # the prompt's last token predicts answer[0]
        assert batch.answer_at[s - 1].tolist() == [0, start + len(prompt) - 1]
        assert int(batch.named[s - 1]) == synthetic.named_color(text_question[s - 1])
        assert set(batch.label_question[0, start + len(prompt) - 1 : end - 1].tolist()) == {s - 1}
        assert processor.decode(answer[:-1]).strip() == text and answer[-1] == processor.special.eos
        start = end
    assert [x for x in labels if x >= 0] == [t for _, a in item.segments for t in a]
    # The first question's tokens are exactly what evaluation sends for that question.
    assert ids[: n + len(item.segments[0][0])] == item.request.input_ids.tolist()
    assert batch.crops.shape[0] == sum(batch.crops_per_sample) and batch.n_answer_tokens == 2 * len(
        [t for _, a in item.segments for t in a]
    )


def test_a_packed_question_sees_the_image_and_itself_only(tiny_dir: Path) -> None:
    processor, _, item = _image_questions(tiny_dir, 3)
    batch = pretrain.collate([item], processor.tokenizer.token_to_id("<|padding|>"))
    mask, seg = batch.attention_mask()[0, 0], batch.segments[0]
    for i in range(len(seg)):
        visible = {int(seg[j]) for j in range(len(seg)) if mask[i, j]}
        assert not mask[i, i + 1 :].any()  # causal
        assert visible == ({0} if seg[i] == 0 else {0, int(seg[i])})


def test_the_question_head_learns_the_named_colour_at_the_answer_position(tiny_dir: Path) -> None:
    processor, _, item = _image_questions(tiny_dir, 8, index=3)  # a yes/no scene: its questions name colours
    batch = pretrain.collate([item], processor.tokenizer.token_to_id("<|padding|>"))
    assert (batch.named > 0).any()
    _train_read_out(tiny_dir, batch, "question", steps=8)


def _train_read_out(tiny_dir: Path, batch, loss_name: str, steps: int):
    """Train the model and a QuestionHead on one batch's `loss_name` loss: it must halve, and only the first
    two scheduled blocks (before the read-out) may get gradients. Returns (model, head, schedule)."""
    torch.manual_seed(0)
    model = load_model(tiny_dir).requires_grad_(True)
    head = pretrain.QuestionHead(model.config.d_model)
    schedule = pretrain.sample_step_plan(KnobSpace.from_config(model.config), 0, 0, 1.0).schedule
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = pretrain.batch_losses(model, batch, schedule, head)[loss_name]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    grads = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0 and ".blocks." in n
    }
    assert {n.split(".")[3] for n in grads} == {"0", "1"}  # read after the first two scheduled blocks only
    return model, head, schedule


def test_a_packed_batch_trains_as_its_questions_one_by_one(tiny_dir: Path) -> None:
    """The packed loss is the mean of the same questions' losses, each asked alone."""
    processor, qas, item = _image_questions(tiny_dir, 3)
    pad = processor.tokenizer.token_to_id("<|padding|>")
    model = load_model(tiny_dir)
    schedule = pretrain.sample_step_plan(KnobSpace.from_config(model.config), 0, 0, 1.0).schedule
    with torch.no_grad():
        packed = float(pretrain.batch_losses(model, pretrain.collate([item], pad), schedule)["answer"])
        alone = [
            pretrain.image_questions(processor, pretrain.train_sample(3, 2), [qa], 3, processor.special.eos)
            for qa in qas
        ]
        losses = [float(pretrain.batch_losses(model, pretrain.collate([a], pad), schedule)["answer"]) for a in alone]
    assert packed == pytest.approx(np.mean(losses), rel=1e-5)


def test_group_mean() -> None:
    values = torch.tensor([1.0, 3.0, 2.0, 10.0])
    assert pretrain.group_mean(values, torch.tensor([0, 0, 2, 1]), 3).tolist() == [2.0, 10.0, 2.0]


def test_detail_steps_see_detail_images_only_at_the_top_tier(tmp_path: Path) -> None:
    cfg = dataclasses.replace(QUICK, steps=4, batch_size=2, detail_every=2)
    run = pretrain.RunDir(tmp_path / "run")
    run.prepare(cfg)
    top = KnobSpace.from_config(MolmoeConfig.from_folder(run.init)).tiers[-1]
    steps = list(pretrain.StepStream(run.init, cfg, 0))
    for step, plan, batch in steps:
        detail = step in (1, 3)
        # every detail image's own question is a detail one; the recipe mix has none
        assert ((batch.asked > 0).sum() == cfg.batch_size) if detail else not (batch.asked > 0).any()
        assert plan.max_crops == top or not detail
    with pytest.raises(ValueError, match="detail_every must be >= 0"):
        pretrain.PretrainConfig(detail_every=-1)


def test_a_short_run_lowers_the_loss_and_exports_a_checkpoint(tmp_path: Path) -> None:
    cfg = dataclasses.replace(QUICK, steps=16, batch_size=4)
    run = pretrain.RunDir(tmp_path / "run")
    run.prepare(cfg)
    fixed = next(iter(pretrain.StepStream(run.init, dataclasses.replace(cfg, seed=99, full_plan_prob=1.0), 0)))[2]
    full = pretrain.sample_step_plan(KnobSpace.from_config(MolmoeConfig.from_folder(run.init)), 0, 0, 1.0).schedule
    with torch.no_grad():
        before = float(pretrain.batch_losses(load_model(run.init), fixed, full)["answer"])
    folder = pretrain.train(tmp_path / "run", cfg)
    with torch.no_grad():
        after = float(pretrain.batch_losses(load_model(folder), fixed, full)["answer"])
    assert after < 0.7 * before, (before, after)
    assert load_model(folder).config == MolmoeConfig.from_folder(run.init)
    assert (tmp_path / "run" / "curves.png").is_file()
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + cfg.steps


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    straight = pretrain.train(tmp_path / "straight", QUICK)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the state saved at step 3
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(tmp_path / "resumed", QUICK)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = pretrain.train(tmp_path / "resumed", QUICK)

    a, b = load_model(straight).state_dict(), load_model(resumed).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    steps = [line.split(",")[0] for line in (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(QUICK.steps)]  # no duplicated or missing step rows


def test_the_decoder_stage_leaves_a_frozen_vision_backbone_as_the_vision_stage_left_it(tmp_path: Path) -> None:
    """With vision_lr_scale 0 the decoder steps train the decoder only: runs that differ in decoder steps only
    end with the same vision weights and different decoder weights."""
    longer = load_model(pretrain.train(tmp_path / "a", QUICK)).state_dict()
    shorter = load_model(pretrain.train(tmp_path / "b", dataclasses.replace(QUICK, steps=2))).state_dict()
    assert all(torch.equal(longer[n], shorter[n]) for n in longer if "vision_backbone" in n)
    assert not torch.equal(longer["model.transformer.wte.embedding"], shorter["model.transformer.wte.embedding"])


def test_logs_written_before_the_first_save_are_dropped_on_resume(tmp_path: Path) -> None:
    run = pretrain.RunDir(tmp_path)
    for path in (run.vision_metrics, run.metrics, run.eval):
        write_rows(path, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}], ["step", "loss"])
    assert run.load_state({}, vision_steps=5) == 0  # no state saved: the run starts over
    assert all(read_rows(path) == [] for path in (run.vision_metrics, run.metrics, run.eval))


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    pretrain.RunDir(tmp_path).prepare(QUICK)
    with pytest.raises(ValueError, match="lr"):
        pretrain.RunDir(tmp_path).prepare(dataclasses.replace(QUICK, lr=1e-4))


def test_config_validation_and_schedule() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        pretrain.PretrainConfig(batch_size=0)
    cfg = pretrain.PretrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(99) == pytest.approx(0.1, abs=1e-3)


def test_vision_items_carry_the_view_and_its_labels(tiny_dir: Path, knobs: KnobSpace) -> None:
    vision = MolmoeProcessor.from_pretrained(tiny_dir).vision
    n = len(pretrain.VISION_QTYPES)
    samples = (pretrain.vision_sample(0, pretrain.VISION_QTYPES.index("count") + n * i) for i in range(20))
    count = next(s.scene for s in samples if len(s.scene.shapes) > 1)
    single = pretrain.vision_sample(0, pretrain.VISION_QTYPES.index("shape")).scene
    sheet = pretrain.sheet_scene(knobs, 0, 0)
    a, b, c = (pretrain.vision_item(vision, scene, synthetic.render(scene)) for scene in (count, single, sheet))
    processed = MolmoeProcessor.from_pretrained(tiny_dir)("Q", [synthetic.render(count)], max_crops=3)
    np.testing.assert_allclose(a.crop.astype(np.float32), processed.images[0], atol=2e-3)  # the global view, in fp16
    assert a.count == len(count.shapes) - 1 and a.shape == a.color == -1
    (shape,) = single.shapes
    assert b.count == 0 and synthetic.SHAPES[b.shape] == shape.kind and list(synthetic.COLORS)[b.color] == shape.color
    assert set(b.labels.kinds[b.labels.kinds > 0]) == {b.shape + 1}
    assert c.count == c.shape == c.color == -1 and c.labels.digits.any() and (c.mask == 1).all()
    assert pretrain.sheet_scene(knobs, 0, 5) == pretrain.sheet_scene(knobs, 0, 5) != pretrain.sheet_scene(knobs, 0, 6)
    batch = pretrain.vision_batch([a, b, c])
    assert batch.crops.shape[0] == batch.kinds.shape[0] == 3 and batch.kinds.shape[1] == 36
    assert (batch.digits[:2] == -1).all() and (batch.places[:2] == -1).all()  # no digit targets on shape views
    glyphs = torch.from_numpy(c.labels.digits.ravel())
    assert torch.equal(batch.digits[2], glyphs - 1)  # digit d on glyph tokens, -1 (ignored) elsewhere
    assert torch.equal(batch.places[2] >= 0, glyphs > 0)


def test_vision_steps_read_then_mix_then_sharpen_and_never_repeat_a_sheet(tiny_dir: Path) -> None:
    cfg = pretrain.PretrainConfig(
        vision_steps=8, vision_read_steps=2, vision_sharpen_steps=2, vision_batch_size=3, vision_sheets=2,
        vision_pool=4,
    )  # fmt: skip
    stream = pretrain.VisionStream(tiny_dir, cfg, 0)
    views = [stream.views(step) for step in range(cfg.vision_steps)]
    assert [len(i) for i, _ in views] == [0, 0, 3, 3, 3, 3, 2, 2]
    assert [len(s) for _, s in views] == [3, 3, 2, 2, 2, 2, 3, 3]
    sheets = [i for _, s in views for i in s]
    assert sheets == list(range(len(sheets)))  # each sheet once, in order
    shapes = [i for i, _ in views[2:]]
    assert shapes == [[0, 1, 2], [3, 0, 1], [2, 3, 0], [1, 2, 3], [0, 1], [2, 3]]  # the shape pool in turn
    with pytest.raises(ValueError, match="vision_read_steps"):
        pretrain.PretrainConfig(vision_steps=2, vision_read_steps=3, vision_sharpen_steps=0)
    with pytest.raises(ValueError, match="vision_sharpen_steps"):
        pretrain.PretrainConfig(vision_steps=4, vision_read_steps=2, vision_sharpen_steps=3)
    with pytest.raises(ValueError, match="vision_lr_scale"):
        pretrain.PretrainConfig(vision_lr_scale=-0.1)


def _reading_sample() -> synthetic.Sample:
    return next(pretrain.train_sample(3, i) for i, q in enumerate(pretrain.TRAIN_MIX) if q == "read")


def test_a_reading_image_routes_each_digit_to_its_glyph_tokens(tiny_dir: Path) -> None:
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    sample = _reading_sample()
    qa = [(sample.question, sample.answer, "read")]
    item = pretrain.image_questions(processor, sample, qa, 12, processor.special.eos)
    other = pretrain.image_questions(processor, pretrain.train_sample(3, 0), qa, 12, processor.special.eos)
    assert other.glyph_positions() == [] and len(item.glyph_positions()) == len(sample.answer)
    batch = pretrain.collate([other, item], processor.tokenizer.token_to_id("<|padding|>"))
    assert len(batch.route_at) == len(sample.answer)  # at 12 crops each glyph owns tokens
    image_positions = set(item.request.image_input_idx[item.request.image_input_idx >= 0].tolist())
    for (row, at), keys, digit in zip(batch.route_at.tolist(), batch.route_keys, sample.answer, strict=True):
        assert row == 1 and processor.decode([int(batch.labels[row, at])]) == digit  # that position writes this digit
        assert set(keys[keys >= 0].tolist()) <= image_positions
    # Digit p is routed to tokens that erasing glyph p changes more than erasing any other glyph.
    change = item.glyphs.change
    for place, keys in enumerate(batch.route_keys):
        tokens = np.isin(item.request.image_input_idx, keys[keys >= 0].numpy())
        assert tokens.any() and (change[place][tokens] > 0.5 * change.sum(0)[tokens]).all()


def test_glyph_tokens_lie_left_to_right(tiny_dir: Path) -> None:
    """What erasing a glyph changes is that glyph: at 12 crops the first and the last glyph each own tokens
    (none twice), and in a crop that shows both, the first one's lie further left."""
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    for sample in synthetic.generate("validation", 3, 0, ("read",)):
        request = processor(sample.question + pretrain.POST_PROMPT, [sample.image], max_crops=12)
        glyphs = pretrain.glyph_tokens(processor, sample, request, 12)
        first, last = glyphs.owned(0), glyphs.owned(len(sample.answer) - 1)
        assert glyphs.change.shape[0] == len(sample.answer) and first.any() and last.any() and not (first & last).any()
        side = math.isqrt(first.shape[1])  # tokens per row of a crop
        both = [c for c in range(len(first)) if first[c].any() and last[c].any()]
        assert both and all(
            (np.nonzero(first[c])[0] % side).mean() < (np.nonzero(last[c])[0] % side).mean() for c in both
        )


def test_the_route_loss_is_minus_log_the_attention_mass_on_the_glyph(tiny_dir: Path) -> None:
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    sample = _reading_sample()
    item = pretrain.image_questions(
        processor, sample, [(sample.question, sample.answer, "read")], 6, processor.special.eos
    )
    batch = pretrain.collate([item], processor.tokenizer.token_to_id("<|padding|>"))
    model = load_model(tiny_dir)
    x = model.embed(batch.input_ids, model.encode_images(batch.crops, batch.crop_masks)[None], batch.image_input_idx)
    rope = model.rope(batch.positions)
    q, k, _ = model.model.transformer.blocks[2].attn.project(x, rope)
    mask = batch.attention_mask()[0, 0]
    expected = []
    for (_, at), keys in zip(batch.route_at.tolist(), batch.route_keys):
        scores = (q[0, :, at, None] @ k[0].transpose(-1, -2))[:, 0] / q.shape[-1] ** 0.5  # [heads, positions]
        weights = scores.masked_fill(~mask[at], float("-inf"))
        expected.append(-weights.softmax(-1)[:, keys[keys >= 0]].sum(-1).log())  # per head
    loss = pretrain.route_loss(model, 2, x, rope, batch)
    torch.testing.assert_close(loss, torch.cat(expected).mean(), rtol=1e-4, atol=1e-5)


def test_vision_steps_lower_the_read_out_loss_and_touch_only_the_vision_backbone(
    tiny_dir: Path, knobs: KnobSpace
) -> None:
    torch.manual_seed(0)
    model = load_model(tiny_dir).requires_grad_(True)
    heads = pretrain.SceneHeads(model.config.d_model)
    vision = MolmoeProcessor.from_pretrained(tiny_dir).vision
    sheets = [pretrain.sheet_scene(knobs, 0, i) for i in range(2)]
    scenes = [pretrain.vision_sample(0, i).scene for i in range(6)] + sheets
    batch = pretrain.vision_batch([pretrain.vision_item(vision, scene, synthetic.render(scene)) for scene in scenes])
    decoder_before = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_backbone" not in n}
    optimizer = torch.optim.AdamW([*model.model.vision_backbone.parameters(), *heads.parameters()], lr=1e-3)
    losses = []
    for _ in range(10):
        loss, accuracy = pretrain.vision_losses(model, heads, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(accuracy) == set(pretrain.SCENE_READOUTS)
    for name, p in model.named_parameters():
        if name in decoder_before:
            assert torch.equal(p, decoder_before[name]), name


def test_a_run_fine_tunes_a_checkpoint_on_its_own_mix(tmp_path: Path, tiny_dir: Path) -> None:
    """`init` starts the run from a copy of a checkpoint (no vision steps: its backbone stays as it was) and
    `mix` sets the question types the decoder steps cycle through."""
    cfg = dataclasses.replace(
        QUICK,
        steps=2,
        vision_steps=0,
        vision_read_steps=0,
        vision_sharpen_steps=0,
        mix="detail,color",
        init=str(tiny_dir),
    )
    assert [pretrain.train_sample(0, i, cfg.train_mix).qtype for i in range(4)] == ["detail", "color"] * 2
    assert {s.qtype for s in pretrain.validation_samples(0, 12, cfg.train_mix)} == {*synthetic.QTYPES, "detail"}
    folder = pretrain.train(tmp_path / "run", cfg)
    start, tuned = load_model(tiny_dir).state_dict(), load_model(folder).state_dict()
    same = {n: torch.equal(start[n].bfloat16(), tuned[n].bfloat16()) for n in start}  # the export is bf16
    assert all(same[n] for n in start if "vision_backbone" in n) and not same["model.transformer.wte.embedding"]
    assert (tiny_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_mix_and_init_are_checked(tmp_path: Path, capsys) -> None:
    assert pretrain.PretrainConfig().train_mix == pretrain.TRAIN_MIX
    with pytest.raises(ValueError, match="mix must be comma-separated question types"):
        pretrain.PretrainConfig(mix="color,colour")
    with pytest.raises(ValueError, match="init must be a checkpoint folder"):
        pretrain.PretrainConfig(init=str(tmp_path))
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    flat = capsys.readouterr().out.replace("\n", "").replace(" ", "")
    assert "--mix" in flat and f"(default:{','.join(pretrain.TRAIN_MIX)})" in flat


def test_a_detail_image_routes_its_colour_answer_to_the_mark_tokens(tiny_dir: Path) -> None:
    """The position that writes a detail answer (the prompt's last: a colour is one token) is routed to the
    image tokens that painting the mark over changes."""
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    (sample,) = synthetic.generate("train", 1, 0, ("detail",))
    qas = pretrain.sample_questions(sample, random.Random(0), 6)
    assert [q[2] for q in qas] == ["detail", "color"]
    for tier in (3, 12):
        item = pretrain.image_questions(processor, sample, qas, tier, processor.special.eos)
        batch = pretrain.collate([item], processor.tokenizer.token_to_id("<|padding|>"))
        (at,), (keys,) = batch.route_at.tolist(), batch.route_keys
        assert at == batch.answer_at[0].tolist()
        assert processor.decode([int(batch.labels[at[0], at[1]])]).strip() == sample.answer
        tokens = np.isin(item.request.image_input_idx, keys[keys >= 0].numpy())
        assert tokens.any() and (item.glyphs.change[0][tokens] > 0).all()
        kept = item.request.image_input_idx >= 0  # tokens in a crop's overlap margin have no position
        assert item.glyphs.change[0][kept & ~tokens].max() < 0.05 * item.glyphs.change[0].max()


def test_the_mark_read_out_learns_a_detail_answer_at_the_answer_position(tiny_dir: Path) -> None:
    """On detail questions only, QuestionHead's second read-out names the mark's colour where the answer is
    predicted, after the first two scheduled blocks; a batch without detail questions has no such loss."""
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    pad, eos = processor.tokenizer.token_to_id("<|padding|>"), processor.special.eos
    (sample,) = synthetic.generate("train", 1, 0, ("detail",))
    qas = pretrain.sample_questions(sample, random.Random(0), 6)
    batch = pretrain.collate([pretrain.image_questions(processor, sample, qas, 12, eos)], pad)
    mark_color = 1 + list(synthetic.COLORS).index(sample.answer)
    assert batch.asked.tolist() == [mark_color if qtype == "detail" else 0 for _, _, qtype in qas]
    model, head, schedule = _train_read_out(tiny_dir, batch, "mark", steps=6)
    _, _, plain = _image_questions(tiny_dir, 3)
    assert "mark" not in pretrain.batch_losses(model, pretrain.collate([plain], pad), schedule, head)
