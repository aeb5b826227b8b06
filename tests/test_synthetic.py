"""The synthetic VQA suite: deterministic, right by construction, split-disjoint, and its lmms-eval tasks.

The task tests run offline against the committed ``tasks/synth_*`` files; no model is involved.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmms_adaptive.default import synthetic as syn

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tasks"

# task name -> (split, number of docs, question types)
TASKS = {
    "synth_vqa_val": ("validation", 75, set(syn.VQA_QTYPES)),
    "synth_vqa_test": ("test", 150, set(syn.VQA_QTYPES)),
    "synth_pope_val": ("validation", 20, {"yesno"}),
    "synth_pope_test": ("test", 40, {"yesno"}),
}
YESNO = re.compile(r"Is there a (\w+) shape in the image\?")


@pytest.fixture(scope="module")
def samples() -> list[syn.Sample]:
    return syn.generate("train", 200, seed=7)


def of_type(samples: list[syn.Sample], qtype: str) -> list[syn.Sample]:
    return [s for s in samples if s.qtype == qtype]


def pixels(sample: syn.Sample) -> np.ndarray:
    return np.asarray(sample.image)


def foreground(sample: syn.Sample) -> np.ndarray:
    return np.any(pixels(sample) != np.array(sample.scene.background, dtype=np.uint8), axis=2)


def components(sample: syn.Sample) -> int:
    """8-connected foreground blobs (a triangle's sharpest corner may touch its body only diagonally)."""
    from scipy import ndimage

    return ndimage.label(foreground(sample), structure=np.ones((3, 3)))[1]


def fingerprint(sample: syn.Sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + sample.question.encode()).hexdigest()


# --------------------------------------------------------------------------- generator


def test_deterministic_per_seed():
    a, b, c = syn.generate("train", 15, seed=3), syn.generate("train", 15, seed=3), syn.generate("train", 15, seed=4)
    assert [fingerprint(s) for s in a] == [fingerprint(s) for s in b]
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert all(x.answer == y.answer and x.scene == y.scene for x, y in zip(a, b))
    assert sum(fingerprint(x) != fingerprint(y) for x, y in zip(a, c)) >= 14


def test_stream_and_qtype_subsets_agree():
    stream = syn.generate_stream(seed=5)
    prefix = [next(stream) for _ in range(10)]
    assert [fingerprint(s) for s in prefix] == [fingerprint(s) for s in syn.generate("train", 10, seed=5)]
    # the k-th sample of a type does not depend on which other types are mixed in
    full = {s.sample_id: s for s in syn.generate("validation", 20, seed=5)}
    for s in syn.generate("validation", 8, seed=5, qtypes=("read", "yesno")):
        assert fingerprint(full[s.sample_id]) == fingerprint(s)


def test_sample_structure(samples):
    assert len({s.sample_id for s in samples}) == len(samples)
    assert collections.Counter(s.qtype for s in samples) == {q: 40 for q in syn.QTYPES}
    assert len({s.image.size for s in samples}) >= 10
    vocabulary = set(syn.vocabulary())
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size == s.scene.size
        assert s.answers == (s.answer,) * 10 and s.answer
        assert s.question == s.question.capitalize()  # textvqa's doc_to_text capitalizes
        assert set(syn.tokens(s.question)) | set(syn.tokens(s.answer)) <= vocabulary, s.question
    assert list(syn.vocabulary()) == sorted(vocabulary)


def test_color_is_the_dominant_colour(samples):
    for s in of_type(samples, "color"):
        (shape,) = s.scene.shapes
        assert s.question == f"What color is the {shape.kind}?" and s.answer == shape.color
        fg = pixels(s)[foreground(s)].astype(np.int64)
        packed = np.bincount((fg[:, 0] << 16) | (fg[:, 1] << 8) | fg[:, 2])
        r, g, b = syn.COLORS[s.answer]
        assert packed.argmax() == (r << 16) | (g << 8) | b


def test_shape_is_the_single_object(samples):
    for s in of_type(samples, "shape"):
        (shape,) = s.scene.shapes
        assert s.answer == shape.kind and s.answer in syn.SHAPES
        assert components(s) == 1


def test_count_matches_connected_components(samples):
    counts = of_type(samples, "count")
    for s in counts:
        assert s.answer == str(len(s.scene.shapes))
        assert components(s) == int(s.answer), s.sample_id
    assert {s.answer for s in counts} == {str(n) for n in range(1, 7)}


def test_view_labels_mark_each_object_where_the_global_view_shows_it(samples):
    """Labels come from the scene; check them against the rendered pixels through the processor's geometry."""
    from lmms_adaptive.core.processor import fit_box

    size, cell = (336, 336), 56
    for s in of_type(samples, "count") + of_type(samples, "shape"):
        labels = syn.view_labels(s.scene, size, cell)
        kinds, colors = labels.kinds, labels.colors
        assert kinds.shape == colors.shape == (6, 6)
        assert ((kinds > 0) == (colors > 0)).all() and not labels.digits.any() and not labels.places.any()
        new_h, new_w, top, left = fit_box(s.scene.size[1], s.scene.size[0], size)
        scale = new_w / s.scene.size[0]
        for shape in s.scene.shapes:  # the cell under each object's centre is labelled with it, once it is large
            if shape.r * scale < cell / 3:
                continue
            row, col = int((top + shape.cy * scale) // cell), int((left + shape.cx * scale) // cell)
            assert kinds[row, col] == 1 + syn.SHAPES.index(shape.kind), s.sample_id
            assert colors[row, col] == 1 + list(syn.COLORS).index(shape.color), s.sample_id
        assert set(kinds[kinds > 0]) <= {1 + syn.SHAPES.index(o.kind) for o in s.scene.shapes}
        # cells with no foreground pixel at all in the resized image are background
        fg = np.zeros(size, dtype=bool)
        fg[top : top + new_h, left : left + new_w] = np.asarray(
            Image.fromarray(foreground(s)).resize((new_w, new_h), Image.NEAREST)
        )
        empty = ~fg.reshape(6, cell, 6, cell).any(axis=(1, 3))
        assert (kinds[empty] == 0).all(), s.sample_id


def test_yesno_rederived_and_balanced(samples):
    yesno = of_type(samples, "yesno")
    for s in yesno:
        (color,) = YESNO.fullmatch(s.question).groups()
        present = {o.color for o in s.scene.shapes}
        assert s.answer == ("yes" if color in present else "no")
        assert components(s) == len(s.scene.shapes)
        if s.answer == "no":
            lookalike = any(color in syn.LOOKALIKES[c] for c in present)
            assert lookalike == (s.category == "adversarial")
    assert collections.Counter(s.answer for s in yesno) == {"yes": 20, "no": 20}
    assert collections.Counter((s.category, s.answer) for s in yesno[:40]) == {
        ("random", "yes"): 10, ("random", "no"): 10, ("adversarial", "yes"): 10, ("adversarial", "no"): 10
    }  # fmt: skip


COLOR_Q = re.compile(r"What color is the (\w+)\?")


def test_questions_about_a_scene_are_right_by_construction(samples):
    rng = random.Random(0)
    seen = collections.Counter()
    for s in samples:
        questions = syn.questions_about(s.scene, rng)
        assert len({q for q, _, _ in questions}) == len(questions)  # no question twice
        present = [(o.kind, o.color) for o in s.scene.shapes]
        for question, answer, qtype in questions:
            seen[qtype, answer if qtype == "yesno" else ""] += 1
            if qtype == "read":
                assert question == syn.Q_READ and [answer] == [t.text for t in s.scene.texts] and len(questions) == 1
            elif qtype == "count":
                assert question == syn.Q_COUNT and answer == str(len(present))
            elif qtype == "shape":
                assert question == syn.Q_SHAPE and [answer] == [k for k, _ in present]
            elif qtype == "color":
                (kind,) = COLOR_Q.fullmatch(question).groups()
                assert [answer] == [c for k, c in present if k == kind]  # only asked of a kind seen once
            else:
                (color,) = YESNO.fullmatch(question).groups()
                assert answer == ("yes" if color in {c for _, c in present} else "no")
        if not s.scene.texts:
            yes = [a for _, a, t in questions if t == "yesno"]
            colors = len({c for _, c in present})  # one absent colour per present one, while there are any
            assert yes.count("yes") == colors and yes.count("no") == min(colors, len(syn.COLORS) - colors)
        if s.answer != "no":  # an absent colour is drawn afresh; every other question of the sample is there
            assert (s.question, s.answer, s.qtype) in questions
    assert seen["yesno", "yes"] >= seen["yesno", "no"] > 0.8 * seen["yesno", "yes"]
    assert seen["color", ""] > 0 and seen["read", ""] > 0


def test_named_color():
    assert syn.named_color("Is there a red shape in the image?") == 1
    assert syn.named_color(syn.Q_YESNO.format(color="gray")) == len(syn.COLORS)
    assert syn.named_color("What color is the star?") == 0
    assert syn.named_color(syn.Q_COUNT) == 0


def test_lookalikes_are_symmetric_and_cover_every_colour():
    assert set(syn.LOOKALIKES) == set(syn.COLORS)
    assert all(k in syn.LOOKALIKES[other] for k, others in syn.LOOKALIKES.items() for other in others)


def decode_text(text: syn.Text, ink: np.ndarray) -> str:
    """Read the bitmap font back off an ink mask, one font module at a time."""
    lookup = {glyph: char for char, glyph in syn.GLYPHS.items()}
    m, chars = text.module, []
    for i in range(len(text.text)):
        left = text.x + i * (syn.GLYPH_W + 1) * m
        cells = ink[text.y : text.y + syn.GLYPH_H * m : m, left : left + syn.GLYPH_W * m : m]
        chars.append(lookup[tuple("".join("#" if c else "." for c in row) for row in cells)])
    return "".join(chars)


def test_glyphs_are_distinct_and_full_height():
    assert len(set(syn.GLYPHS.values())) == len(syn.GLYPHS)
    for glyph in syn.GLYPHS.values():
        assert len(glyph) == syn.GLYPH_H and all(len(row) == syn.GLYPH_W for row in glyph)
        assert "#" in glyph[0] and "#" in glyph[-1]  # ink spans the whole text height
    assert set(syn.GLYPHS) == set("0123456789")


def test_read_text_is_small_and_right(samples):
    reads = of_type(samples, "read")
    for s in reads:
        (text,), (w, h) = s.scene.texts, s.image.size
        x0, y0, x1, y1 = text.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        ink = np.all(pixels(s) == np.array(syn.TEXT_COLOR, dtype=np.uint8), axis=2)
        ink_y, ink_x = np.nonzero(ink)
        assert x0 <= ink_x.min() and ink_x.max() < x1 and ink_y.min() == y0 and ink_y.max() == y1 - 1
        assert decode_text(text, ink) == text.text == s.answer and s.question == syn.Q_READ
        assert len(text.text) in syn.READ_DIGITS and text.text[0] != "0"
        pitch = (syn.GLYPH_W + 1) * text.module
        assert pitch * syn.processed_scale(w, h, 3) <= syn.CROWDED_GLYPH_TOKENS * syn.TOKEN_PX
        assert pitch * syn.processed_scale(w, h, 12) >= syn.LEGIBLE_GLYPH_TOKENS * syn.TOKEN_PX
    assert {len(s.answer) for s in reads} == set(syn.READ_DIGITS)


def test_erase_glyph_blanks_that_glyph_only(samples):
    s = of_type(samples, "read")[0]
    (text,) = s.scene.texts
    before = pixels(s)
    for place in range(len(text.text)):
        after = np.asarray(syn.erase_glyph(s.image, text, place))
        changed_y, changed_x = np.nonzero(np.any(after != before, axis=2))
        x0, y0 = text.x + place * (syn.GLYPH_W + 1) * text.module, text.y
        x1, y1 = x0 + syn.GLYPH_W * text.module, y0 + syn.GLYPH_H * text.module
        assert x0 <= changed_x.min() and changed_x.max() < x1 and y0 <= changed_y.min() and changed_y.max() < y1
        assert (after[y0:y1, x0:x1] == np.array(syn.SIGN_COLOR, dtype=np.uint8)).all()
        ink = np.all(after == np.array(syn.TEXT_COLOR, dtype=np.uint8), axis=2)
        assert decode_text(syn.Text(text.text[place + 1 :], x1 + text.module, y0), ink) == text.text[place + 1 :]
    assert (pixels(s) == before).all()  # the sample's own image is left as it was


def test_sign_sheet_is_a_crop_at_the_tier_scale_and_its_labels_name_each_glyph():
    from lmms_adaptive.core.processor import DEFAULT_VISION

    crop, cell = DEFAULT_VISION.crop_size, syn.TOKEN_PX
    for tier in (3, 6, 12):
        for seed in range(4):
            scene = syn.sign_sheet(random.Random(seed), tier)
            side = scene.size[0]
            assert scene.size == (side, side) and not scene.shapes and len(scene.texts) >= 2
            assert any(crop / syn.processed_scale(w, h, tier) <= side < crop / syn.processed_scale(w, h, tier) + 1
                       for w, h in syn.READ_SIZES)  # fmt: skip
            ink = np.all(np.asarray(syn.render(scene)) == np.array(syn.TEXT_COLOR, dtype=np.uint8), axis=2)
            labels = syn.view_labels(scene, (crop, crop), cell)
            assert not labels.kinds.any() and ((labels.digits > 0) == (labels.places > 0)).all()
            scale = crop / side
            for text in scene.texts:
                assert len(text.text) in syn.READ_DIGITS and text.text[0] != "0"
                x0, y0, x1, y1 = text.box
                if x0 >= 0 and y0 >= 0 and x1 <= side and y1 <= side:
                    assert decode_text(text, ink) == text.text
                for place, char in enumerate(text.text, start=1):  # the token under a glyph's centre names it
                    left = text.x + (place - 1) * (syn.GLYPH_W + 1) * text.module
                    cx, cy = left + syn.GLYPH_W * text.module / 2, text.y + syn.GLYPH_H * text.module / 2
                    row, col = int(cy * scale // cell), int(cx * scale // cell)
                    if 0 <= cx < side and 0 <= cy < side and tier == 12:  # a glyph fills most of its token
                        assert labels.digits[row, col] == 1 + int(char) and labels.places[row, col] == place


def test_processed_scale_shrinks_with_fewer_crops():
    for w, h in syn.READ_SIZES:
        s3, s6, s12 = (syn.processed_scale(w, h, c) for c in (3, 6, 12))
        assert s3 < s6 < s12 and s3 / s12 < 0.45
    assert syn.processed_scale(320, 240, 3) == syn.processed_scale(320, 240, 12)  # small images: same view


def test_splits_are_disjoint():
    by_split = {split: syn.generate(split, 60, seed=0) for split in syn.SPLITS}
    for split, samples in by_split.items():
        assert all(syn.split_of(s.scene, s.question) == split for s in samples)
    prints = [{fingerprint(s) for s in samples} for samples in by_split.values()]
    assert all(len(p) == 60 for p in prints)
    assert not (prints[0] & prints[1] or prints[0] & prints[2] or prints[1] & prints[2])
    with pytest.raises(ValueError):
        syn.generate("dev", 1, seed=0)


def test_generation_is_fast():
    start = time.perf_counter()
    syn.generate("train", 200, seed=11)
    assert time.perf_counter() - start < 4.0  # ~0.4 s on one core: 1,000 samples take ~2 s


# --------------------------------------------------------------------------- lmms-eval tasks


@pytest.fixture(scope="module")
def tasks(lmms_env):
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)
    assert set(manager.task_index["synth"]["task"]) == {"synth_vqa_test", "synth_pope_test"}
    assert set(manager.task_index["synth_val"]["task"]) == {"synth_vqa_val", "synth_pope_val"}
    return get_task_dict(list(TASKS), manager)


@pytest.fixture(scope="module")
def docs(tasks) -> dict[str, list[dict]]:
    """Each task's docs, decoded once (reading a row decodes its PNG)."""
    splits = {name: task.dataset[TASKS[name][0]] for name, task in tasks.items()}
    return {name: [split[i] for i in range(len(split))] for name, split in splits.items()}


def scores(task, docs: list[dict], answer_fn) -> dict[str, list]:
    per_metric = collections.defaultdict(list)
    for doc in docs:
        for metric, value in task.process_results(doc, [answer_fn(doc)]).items():
            per_metric[metric].append(value)
    return per_metric


def test_tasks_build_offline(tasks, docs):
    from PIL import Image

    assert set(tasks) == set(TASKS)
    for name, task in tasks.items():
        split, n_docs, qtypes = TASKS[name]
        data_file = Path(task.config.dataset_kwargs["data_files"][split])
        assert data_file == TASKS_DIR / f"{name}.parquet" and data_file.stat().st_size < 1_000_000
        rows = docs[name]
        assert len(task.eval_docs) == n_docs and {d["qtype"] for d in rows} == qtypes
        assert len({d["question_id"] for d in rows}) == n_docs
        for doc in rows:
            (visual,) = task.doc_to_visual(doc)
            assert isinstance(visual, Image.Image) and visual.mode == "RGB"
            assert task.doc_to_text(doc).endswith("?\nAnswer the question using a single word or phrase.")


def test_task_rows_are_the_generator_samples(docs):
    vqa = syn.generate("test", 150, seed=0, qtypes=syn.VQA_QTYPES)
    for doc, sample in zip(docs["synth_vqa_test"], vqa):
        assert (doc["image_id"], doc["question"], tuple(doc["answers"])) == (
            sample.sample_id,
            sample.question,
            sample.answers,
        )
        assert doc["image"].convert("RGB").tobytes() == sample.image.tobytes()
    pope = docs["synth_pope_test"]
    assert [d["image_source"] for d in pope] == [s.sample_id for s in syn.generate("test", 40, 0, ("yesno",))]


def test_vqa_scores(tasks, docs):
    for name in ("synth_vqa_val", "synth_vqa_test"):
        task = tasks[name]
        n_docs = TASKS[name][1]
        assert scores(task, docs[name], lambda d: d["answers"][0].upper())["exact_match"] == [1.0] * n_docs
        assert scores(task, docs[name], lambda d: "zebra")["exact_match"] == [0.0] * n_docs


def test_pope_scores(tasks, docs):
    flip = {"yes": "no", "no": "yes"}
    for name in ("synth_pope_val", "synth_pope_test"):
        task = tasks[name]
        agg = task.aggregation()
        right = scores(task, docs[name], lambda d: d["answer"].capitalize())
        wrong = scores(task, docs[name], lambda d: flip[d["answer"]])
        assert agg["pope_accuracy"](right["pope_accuracy"]) == 1.0
        assert agg["pope_yes_ratio"](right["pope_yes_ratio"]) == 0.5  # balanced
        assert agg["pope_accuracy"](wrong["pope_accuracy"]) == 0.0


def test_make_synthetic_regenerates_committed_files(tmp_path, lmms_env):
    import pyarrow.parquet as pq

    spec = importlib.util.spec_from_file_location("make_synthetic", TASKS_DIR / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(tmp_path), tuple(TASKS))
    for name in TASKS:
        committed, fresh = TASKS_DIR / f"{name}.parquet", tmp_path / f"{name}.parquet"
        assert pq.read_table(fresh).equals(pq.read_table(committed)), (
            f"{name} is stale: run python tasks/make_synthetic.py"
        )


def test_training_tasks_are_more_of_the_validation_split_at_seed_1(lmms_env):
    """The controllers' training split (2,400 rows: too many to regenerate in a test): its size, and a spread of
    its rows against the generator."""
    import datasets

    spec = importlib.util.spec_from_file_location("make_synthetic", TASKS_DIR / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for stem, id_column in (("synth_vqa_train", "image_id"), ("synth_pope_train", "image_source")):
        split, seed, _, qtypes, n, _ = module.FILES[stem]
        rows = datasets.Dataset.from_parquet(str(TASKS_DIR / f"{stem}.parquet"))
        assert (split, seed, len(rows)) == ("validation", 1, n) and n >= 400
        assert collections.Counter(rows["qtype"]) == {q: n // len(qtypes) for q in qtypes}
        for i in (0, 1, n // 3, n // 2 + 1, n - 1):
            sample = syn.make_sample(split, seed, qtypes[i % len(qtypes)], i // len(qtypes))
            assert (rows[i][id_column], rows[i]["question"]) == (sample.sample_id, sample.question)
            assert rows[i]["image"].convert("RGB").tobytes() == sample.image.tobytes()


# --------------------------------------------------------------------------- detail


DETAIL_Q = re.compile(r"What color is the square in the (\w+)\?")


@pytest.fixture(scope="module")
def details() -> list[syn.Sample]:
    return syn.generate("train", 12, seed=7, qtypes=syn.DETAIL_QTYPES)


def test_detail_mark_is_drawn_in_the_answer_colour_inside_the_large_shape(details):
    """The answer is the mark's drawn colour: every pixel of the mark has it and no other pixel does, and the
    large shape's colour, another one, fills the margin of one 3-crop token around the mark."""
    for s in details:
        (mark,), (shape,) = s.scene.marks, s.scene.shapes
        assert DETAIL_Q.fullmatch(s.question).groups() == (shape.kind,) and shape.kind in syn.DETAIL_SHAPES
        assert s.answer == mark.color != shape.color and s.qtype == "detail"
        assert s.answer not in syn.LOOKALIKES[shape.color]
        px = pixels(s)
        x0, y0, x1, y1 = mark.box
        assert (px[y0:y1, x0:x1] == syn.COLORS[s.answer]).all(), s.sample_id
        assert (px == syn.COLORS[s.answer]).all(axis=2).sum() == mark.side**2, s.sample_id
        margin = math.floor(syn.MARK_MARGIN_TOKENS / syn.token_scale(*s.scene.size, 3))
        ring = px[y0 - margin : y1 + margin, x0 - margin : x1 + margin].copy()
        ring[margin:-margin, margin:-margin] = syn.COLORS[shape.color]
        assert (ring == syn.COLORS[shape.color]).all(), s.sample_id
        assert components(s) == 1  # the mark lies inside the shape
    assert len({s.scene.size for s in details}) >= 4 and len({s.answer for s in details}) >= 4


def test_detail_mark_fills_one_patch_on_the_12_crop_grid(details):
    """The mark is MARK_PATCHES patches a side at 12 crops, its edges on that tier's patch grid (to within a
    canvas pixel's rounding); at 3 crops it is under half a patch a side, whatever its alignment there."""
    for width, height in syn.READ_SIZES:
        side = syn.mark_side(width, height)
        at_12, at_3 = (side * syn.processed_scale(width, height, c) / syn.PATCH_PX for c in (12, 3))
        assert abs(at_12 - syn.MARK_PATCHES) < 0.03 and at_3 < 0.5, (width, height, at_12, at_3)
    for s in details:
        (mark,) = s.scene.marks
        sx, sy, left, top = syn.crop_grid(*s.scene.size, 12)
        for edge, scale, offset in ((mark.x, sx, left), (mark.y, sy, top), (mark.box[2], sx, left)):
            off_grid = (edge * scale + offset) % syn.PATCH_PX
            assert min(off_grid, syn.PATCH_PX - off_grid) < 1.0, (s.sample_id, edge, off_grid)


def mark_share(sample: syn.Sample, processor, max_crops: int) -> tuple[float, float]:
    """(most of a crop's patch the mark covers, most of a global-view patch), measured through the processor:
    the per-pixel change when the mark is painted in the large shape's colour, over the full colour difference."""
    from lmms_adaptive.core.processor import DEFAULT_VISION

    (mark,), (shape,) = sample.scene.marks, sample.scene.shapes
    a, b = (
        processor("q", [im], max_crops=max_crops).images
        for im in (sample.image, syn.erase_mark(sample.image, sample.scene))
    )
    std = np.array(DEFAULT_VISION.image_std, dtype=np.float32)
    full = np.abs(np.subtract(syn.COLORS[mark.color], syn.COLORS[shape.color]) / 255 / std).sum()
    crops, n_patches, _ = a.shape
    per_patch = (np.abs(a - b).reshape(crops, n_patches, -1, 3).sum(-1) / full).mean(-1)
    return float(per_patch[1:].max()), float(per_patch[0].max())


def test_the_processor_shows_the_mark_as_a_whole_patch_at_12_crops_only(details):
    from lmms_adaptive.core.processor import MolmoeProcessor

    processor = MolmoeProcessor.from_pretrained(REPO / "lmms_adaptive" / "resources" / "tiny-molmoe-synth")
    for s in details[:4]:
        crop_12, global_12 = mark_share(s, processor, 12)
        crop_3, global_3 = mark_share(s, processor, 3)
        assert crop_12 >= 0.9 and crop_3 < 0.25 and max(global_12, global_3) < 0.2, (s.sample_id, crop_12, crop_3)


def test_detail_questions_and_splits(details):
    rng = random.Random(0)
    for s in details:
        questions = syn.questions_about(s.scene, rng)
        (shape,) = s.scene.shapes
        assert sorted(questions) == sorted(
            [(s.question, s.answer, "detail"), (f"What color is the {shape.kind}?", shape.color, "color")]
        )
        assert set(syn.tokens(s.question)) <= set(syn.vocabulary())
    for split in syn.SPLITS:
        generated = syn.generate(split, 3, seed=1, qtypes=("color", "detail"))
        assert [s.qtype for s in generated] == ["color", "detail", "color"]
        assert all(syn.split_of(s.scene, s.question) == split for s in generated)
    # the mark takes part in the split hash; the other types' scenes hash as before (no marks field in the repr)
    scene = details[0].scene
    unmarked = syn.Scene(scene.size, scene.background, scene.shapes)
    assert repr(scene) == repr(unmarked) and "marks" not in repr(unmarked)
    assert syn.QTYPES == ("color", "shape", "count", "read", "yesno") and "detail" in syn.VQA_QTYPES


def test_erase_mark_leaves_the_scene_without_its_mark(details):
    for s in details[:3]:
        unmarked = syn.Scene(s.scene.size, s.scene.background, s.scene.shapes)
        assert np.array_equal(np.asarray(syn.erase_mark(s.image, s.scene)), np.asarray(syn.render(unmarked)))
