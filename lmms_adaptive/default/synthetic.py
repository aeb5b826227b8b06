"""A seeded, procedural visual-QA suite whose accuracy depends on the vision tier.

Every sample is drawn with PIL from a small set of parameters (a :class:`Scene`), and its answer is
derived from those same parameters, so it is right by construction. Six question types:

- ``color``: "What color is the <shape>?" about one large shape (easy at any tier);
- ``shape``: "What shape is shown?" about one large shape;
- ``count``: "How many shapes are there?" over 1-6 medium, non-overlapping shapes (answer "1".."6");
- ``read``: "What number is written on the sign?": a 2-3 digit number on a sign on a large canvas,
  in the built-in 5x7 bitmap font (:data:`GLYPHS`);
- ``detail``: "What color is the square in the <shape>?" about one small square mark inside one large
  circle or hexagon of another colour, legible at 12 crops only (:data:`DETAIL_QTYPES`);
- ``yesno``: POPE's form "Is there a <colour> shape in the image?" over 2-4 medium shapes, yes/no
  balanced; a "no" names a random absent colour or, adversarially, an absent look-alike of one present
  (:data:`LOOKALIKES`), as POPE's negatives are random or confusable objects. It asks for a colour, not
  a shape kind: the tiny ViT, trained within the CPU budget, tells colours apart in a several-object
  scene but not the kinds of medium shapes (docs/embedded-default.md).

Legibility of ``read`` (the knob dependence). The processor resizes an image so that a tiling of
crops covers it (``select_tiling`` over the image minus the 112 px margins, 224 px windows); a low
``max_crops`` means a heavy downscale of a large canvas. The model sees an image as tokens of 56 x 56
px of the resized image (:data:`TOKEN_PX`: 2 x 2 patches of 28 px, pooled). Glyphs are drawn with a
12 px font module, 72 px apart (:data:`FONT_MODULE`); that pitch in image tokens,
``72 * processed_scale(w, h, max_crops) / 56``, on the ``read`` canvases (:data:`READ_SIZES`):

=============  =======  =======  ========  ===============
canvas         3 crops  6 crops  12 crops  global 336 view
=============  =======  =======  ========  ===============
1280 x 960     0.45     0.75     1.01      0.34
1344 x 1008    0.43     0.71     0.96      0.32
1280 x 1024    0.42     0.70     0.98      0.34
1200 x 1000    0.43     0.72     1.01      0.36
960 x 1280     0.45     0.75     1.01      0.34
1024 x 1280    0.42     0.70     0.98      0.34
1008 x 1344    0.43     0.71     0.96      0.32
=============  =======  =======  ========  ===============

At 12 crops a glyph gets about a token of its own (:data:`LEGIBLE_GLYPH_TOKENS`). At 3 crops two or
more glyphs share each token (:data:`CROWDED_GLYPH_TOKENS`), and a pooled token of a small model has to
carry them all; 6 crops is in between. In pixels every tier keeps the strokes (a module is >= 4 px at
3 crops), so the limit is the model's token budget, not the sampling limit. (Smaller glyphs, down to a
2 px module that is below one pixel per module at 3 crops, were never learned by the tiny ViT within a
CPU budget: docs/embedded-default.md.)

Legibility of ``detail`` (the knob dependence, by the same arithmetic at the ViT's patch). The ViT embeds
each 28 px patch of a crop (:data:`PATCH_PX`) on its own before 2 x 2 patches are pooled into a token, so
what a tier can show is decided per patch. The mark is :data:`MARK_PATCHES` patch a side at 12 crops
(``mark_side``), its edges on that tier's patch grid (:func:`crop_grid`; every crop's patches lie on one
grid of the resized image), so it fills one patch there (0.97-1.00 of it through the processor). On the
``detail`` canvases (:data:`READ_SIZES`) 3 crops resize 0.43-0.45x as much as 12, so it is under half a
patch a side there, at most 0.2 of any patch whatever its alignment (the rest the large shape,
:data:`MARK_MARGIN_TOKENS`), and about a third of a patch in the global view; 6 crops is in between
(0.6 patches). Marks of 1.5 tokens (3 patches) and then 1.52 patches at 12 crops, at any alignment, were
read after fine-tuning nearly as well at 3 crops as at 12 (docs/detail-family.md).

Splits: the parameter space is partitioned by a hash of (scene, question), so a given
(image, question) pair can only ever be produced in one of "train", "validation" and "test".
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from lmms_adaptive.core.processor import DEFAULT_VISION, fit_box, select_tiling

if TYPE_CHECKING:
    import datasets

QTYPES = ("color", "shape", "count", "read", "yesno")
VQA_QTYPES = ("color", "shape", "count", "read", "detail")  # the synth_vqa task files
DETAIL_QTYPES = ("detail",)  # the recipe's detail-only steps (pretrain --detail-every); not in QTYPES, its mix
SPLITS = ("train", "validation", "test")

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 15),
    "orange": (245, 125, 15),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
    "brown": (120, 70, 30),
    "pink": (245, 110, 180),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
BACKGROUNDS: tuple[RGB, ...] = ((255, 255, 255), (246, 243, 232), (234, 241, 250), (240, 248, 236))

SIZES = (
    (320, 240), (400, 300), (480, 360), (640, 480), (800, 600), (1024, 768), (1280, 960),
    (240, 320), (480, 640), (600, 800), (512, 512), (960, 540), (1024, 576),
)  # fmt: skip
# near 4:3 or 5:4: the 3-crop tiling (1 row) is ~0.43x the 12-crop one (3 rows) there
READ_SIZES = ((1280, 960), (1344, 1008), (1280, 1024), (1200, 1000), (960, 1280), (1024, 1280), (1008, 1344))
FONT_MODULE = 12  # px per font cell on the canvas: glyphs are 60 x 84 px, 72 px apart
READ_DIGITS = (2, 3)  # the number on a sign has 2 or 3 digits
TOKEN_PX = 56  # one image token covers 56 x 56 px of a crop (2 x 2 patches of 28 px)
LEGIBLE_GLYPH_TOKENS = 0.9  # glyph pitch in image tokens at 12 crops: at least this
CROWDED_GLYPH_TOKENS = 0.5  # ... and at 3 crops at most this: two or more glyphs share each token
PATCH_PX = TOKEN_PX // 2  # one ViT patch of a crop
MARK_PATCHES = 1  # side of a detail mark at 12 crops in ViT patches, on that tier's patch grid (it fills them)
MARK_MARGIN_TOKENS = 1.0  # the large shape extends this many 3-crop tokens beyond the mark on every side
DETAIL_SHAPES = ("circle", "hexagon")  # large shapes holding a mark: both contain the disc of 0.866 r
TEXT_COLOR: RGB = (25, 25, 25)
SIGN_COLOR: RGB = (252, 252, 248)
SIGN_BORDER: RGB = (90, 90, 90)

# 5x7 digit glyphs, "#" = ink
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPH_W, GLYPH_H = 5, 7

Q_COLOR = "What color is the {shape}?"
Q_SHAPE = "What shape is shown?"
Q_COUNT = "How many shapes are there?"
Q_READ = "What number is written on the sign?"
Q_YESNO = "Is there a {color} shape in the image?"
Q_DETAIL = "What color is the square in the {shape}?"
# neighbours on the colour wheel (brown, black and gray by lightness): the adversarial "no" of a yes/no question
LOOKALIKES: dict[str, tuple[str, ...]] = {
    "red": ("orange", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange", "green"),
    "green": ("yellow", "blue"), "blue": ("green", "purple"), "purple": ("blue", "pink"), "pink": ("purple", "red"),
    "brown": ("orange", "black"), "black": ("brown", "gray"), "gray": ("black",),
}  # fmt: skip


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Shape:
    """A filled shape lying inside the disc of radius ``r`` around (cx, cy)."""

    kind: str
    color: str
    cx: int
    cy: int
    r: int


@dataclass(frozen=True)
class Text:
    """``text`` in the bitmap font, top-left corner at (x, y), ``module`` px per font cell."""

    text: str
    x: int
    y: int
    module: int = FONT_MODULE

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive-exclusive (x0, y0, x1, y1) of the ink area."""
        width = (len(self.text) * (GLYPH_W + 1) - 1) * self.module
        return self.x, self.y, self.x + width, self.y + GLYPH_H * self.module


@dataclass(frozen=True)
class Mark:
    """A filled axis-aligned square of ``side`` px, top-left corner at (x, y), drawn over the shapes."""

    color: str
    x: int
    y: int
    side: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive-exclusive (x0, y0, x1, y1)."""
        return self.x, self.y, self.x + self.side, self.y + self.side


@dataclass(frozen=True)
class Scene:
    """Everything an image is drawn from."""

    size: tuple[int, int]
    background: RGB
    shapes: tuple[Shape, ...] = ()
    texts: tuple[Text, ...] = ()  # signs: a reading question's scene has one
    # a detail question's scene has one; out of the repr so the other scenes hash as before (`split_of`)
    marks: tuple[Mark, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Sample:
    """One question on one image; ``scene`` is what both were made from (tests re-derive answers from it)."""

    image: Image.Image
    question: str
    answers: tuple[str, ...]
    answer: str
    qtype: str
    sample_id: str
    scene: Scene
    category: str = ""  # yesno only: how the negative was sampled ("random" / "adversarial")


# --------------------------------------------------------------------------- geometry and drawing


def processed_scale(width: int, height: int, max_crops: int) -> float:
    """Resize factor the processor applies to a ``width x height`` image at ``max_crops``."""
    margin, window = DEFAULT_VISION.margin_pixels, DEFAULT_VISION.window_pixels
    rows, cols = select_tiling(height - margin, width - margin, window, max_crops)
    return min((rows * window + margin) / height, (cols * window + margin) / width)


def _polygon(kind: str, cx: int, cy: int, r: int) -> list[tuple[float, float]]:
    def ring(n: int, start: float, radii: Sequence[float]) -> list[tuple[float, float]]:
        return [
            (cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n))
            for i in range(n)
        ]  # fmt: skip

    if kind == "square":
        return ring(4, math.pi / 4, [r])
    if kind == "triangle":
        return ring(3, -math.pi / 2, [r])
    if kind == "star":
        return ring(10, -math.pi / 2, [r, 0.45 * r])
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if kind == "hexagon":
        return ring(6, 0.0, [r])
    if kind == "cross":
        a, w = 0.95 * r, 0.3 * r
        corners = [(w, a), (w, w), (a, w)]  # one arm's outline, turned by quarter turns: (x, y) -> (y, -x)
        for _ in range(3):
            corners += [(y, -x) for x, y in corners[-3:]]
        return [(cx + dx, cy + dy) for dx, dy in corners]
    raise ValueError(f"unknown shape {kind!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: RGB | int | None = None) -> None:
    """Draw in the shape's colour, or in ``fill`` (label maps draw class ids)."""
    fill = COLORS[shape.color] if fill is None else fill
    if shape.kind == "circle":
        draw.ellipse((shape.cx - shape.r, shape.cy - shape.r, shape.cx + shape.r, shape.cy + shape.r), fill=fill)
    else:
        draw.polygon(_polygon(shape.kind, shape.cx, shape.cy, shape.r), fill=fill)


def _draw_mark(draw: ImageDraw.ImageDraw, mark: Mark, fill: RGB | int) -> None:
    x0, y0, x1, y1 = mark.box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)


def _glyph_boxes(text: Text) -> list[tuple[int, int, int, int]]:
    """Each glyph's 5x7-module cell, inclusive (x0, y0, x1, y1) as PIL draws rectangles."""
    m = text.module
    lefts = [text.x + i * (GLYPH_W + 1) * m for i in range(len(text.text))]
    return [(x, text.y, x + GLYPH_W * m - 1, text.y + GLYPH_H * m - 1) for x in lefts]


def _draw_text(draw: ImageDraw.ImageDraw, text: Text) -> None:
    m = text.module
    for char, (left, top, _, _) in zip(text.text, _glyph_boxes(text)):
        for row, line in enumerate(GLYPHS[char]):
            for col, cell in enumerate(line):
                if cell == "#":
                    x, y = left + col * m, top + row * m
                    draw.rectangle((x, y, x + m - 1, y + m - 1), fill=TEXT_COLOR)


def sign_box(text: Text) -> tuple[int, int, int, int]:
    """The sign drawn around a text: a padding of 3 modules (inclusive-exclusive box)."""
    pad = 3 * text.module
    x0, y0, x1, y1 = text.box
    return x0 - pad, y0 - pad, x1 + pad, y1 + pad


def render(scene: Scene) -> Image.Image:
    """Draw a scene (pure: the same scene always gives the same pixels)."""
    image = Image.new("RGB", scene.size, scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    for mark in scene.marks:
        _draw_mark(draw, mark, COLORS[mark.color])
    for text in scene.texts:
        x0, y0, x1, y1 = sign_box(text)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=SIGN_COLOR, outline=SIGN_BORDER, width=text.module)
        _draw_text(draw, text)
    return image


def erase_glyph(image: Image.Image, text: Text, place: int) -> Image.Image:
    """A copy of a rendered ``image`` with the glyph at ``place`` (0 = leftmost) of ``text`` painted over in the
    sign's colour: which image tokens change then is where a model sees that glyph."""
    erased = image.copy()
    ImageDraw.Draw(erased).rectangle(_glyph_boxes(text)[place], fill=SIGN_COLOR)
    return erased


def erase_mark(image: Image.Image, scene: Scene) -> Image.Image:
    """A copy of a rendered detail ``image`` with its mark painted over in the large shape's colour: which image
    tokens change then is where a model sees the mark."""
    erased = image.copy()
    (shape,) = scene.shapes
    for mark in scene.marks:
        _draw_mark(ImageDraw.Draw(erased), mark, COLORS[shape.color])
    return erased


@dataclass(frozen=True)
class ViewLabels:
    """Per-token labels of a view (0 = nothing there): the targets of the vision stage of pre-training."""

    kinds: np.ndarray  # shape kind i + 1 = SHAPES[i]
    colors: np.ndarray  # colour j + 1 = the j-th of COLORS
    digits: np.ndarray  # digit d + 1 of a sign's glyph
    places: np.ndarray  # that glyph's place in its number, 1 = the leftmost


def view_labels(scene: Scene, size: tuple[int, int], cell: int, min_cover: float = 0.05) -> ViewLabels:
    """Per-cell labels of the scene as the processor shows it fitted into ``size`` (the global view, or a
    crop of a :func:`sign_sheet`; :func:`~lmms_adaptive.core.processor.fit_box`) and cut into ``cell`` px cells
    (one cell = one pooled image token). A cell takes the most frequent object (shape, or a glyph's ink
    box) among its pixels once objects cover ``min_cover`` of it. Pure, and right by construction."""
    maps = [Image.new("L", scene.size, 0) for _ in range(4)]
    kinds, colors, digits, places = (ImageDraw.Draw(m) for m in maps)
    for shape in scene.shapes:
        _draw_shape(kinds, shape, 1 + SHAPES.index(shape.kind))
        _draw_shape(colors, shape, 1 + list(COLORS).index(shape.color))
    for mark in scene.marks:
        _draw_mark(kinds, mark, 1 + SHAPES.index("square"))
        _draw_mark(colors, mark, 1 + list(COLORS).index(mark.color))
    for text in scene.texts:
        for place, (char, box) in enumerate(zip(text.text, _glyph_boxes(text)), start=1):
            digits.rectangle(box, fill=1 + int(char))
            places.rectangle(box, fill=place)
    new_h, new_w, top, left = fit_box(scene.size[1], scene.size[0], size)
    rows, cols = size[0] // cell, size[1] // cell
    out = []
    for labels, n_classes in zip(maps, (1 + len(SHAPES), 1 + len(COLORS), 1 + len(GLYPHS), 1 + READ_DIGITS[1])):
        canvas = np.zeros(size, dtype=np.int64)
        canvas[top : top + new_h, left : left + new_w] = np.asarray(labels.resize((new_w, new_h), Image.NEAREST))
        cells = (
            canvas[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell).swapaxes(1, 2).reshape(rows, cols, -1)
        )
        share = np.stack([(cells == c).mean(axis=-1) for c in range(n_classes)], axis=-1)
        out.append(np.where(share[..., 1:].sum(axis=-1) >= min_cover, 1 + share[..., 1:].argmax(axis=-1), 0))
    return ViewLabels(*out)


# --------------------------------------------------------------------------- scene planning


def _grid(size: tuple[int, int]) -> tuple[int, int]:
    """(cols, rows) of placement cells, roughly square, at least 6 of them."""
    w, h = size
    if w > 1.2 * h:
        return 4, 3
    if h > 1.2 * w:
        return 3, 4
    return 3, 3


def _scatter(rng: random.Random, size: tuple[int, int], kinds_colors: Sequence[tuple[str, str]]) -> tuple[Shape, ...]:
    """Medium shapes in distinct grid cells, so they never overlap or touch."""
    cols, rows = _grid(size)
    cell_w, cell_h = size[0] / cols, size[1] / rows
    cells = rng.sample(range(cols * rows), len(kinds_colors))
    shapes = []
    for (kind, color), cell in zip(kinds_colors, cells):
        r = int(min(cell_w, cell_h) * rng.uniform(0.25, 0.38))
        slack_x, slack_y = cell_w / 2 - r - 2, cell_h / 2 - r - 2
        cx = int((cell % cols + 0.5) * cell_w + rng.uniform(-slack_x, slack_x))
        cy = int((cell // cols + 0.5) * cell_h + rng.uniform(-slack_y, slack_y))
        shapes.append(Shape(kind, color, cx, cy, r))
    return tuple(shapes)


def _single(rng: random.Random) -> Scene:
    size = rng.choice(SIZES)
    r = int(min(size) * rng.uniform(0.25, 0.4))
    cx = rng.randint(r + 2, size[0] - r - 3)
    cy = rng.randint(r + 2, size[1] - r - 3)
    shape = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, r)
    return Scene(size, rng.choice(BACKGROUNDS), (shape,))


def _plan_color(rng: random.Random, _: int) -> tuple[Scene, str, str, str]:
    scene = _single(rng)
    shape = scene.shapes[0]
    return scene, Q_COLOR.format(shape=shape.kind), shape.color, ""


def _plan_shape(rng: random.Random, _: int) -> tuple[Scene, str, str, str]:
    scene = _single(rng)
    return scene, Q_SHAPE, scene.shapes[0].kind, ""


def _plan_count(rng: random.Random, _: int) -> tuple[Scene, str, str, str]:
    size = rng.choice(SIZES)
    n = rng.randint(1, 6)
    objects = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(n)]
    scene = Scene(size, rng.choice(BACKGROUNDS), _scatter(rng, size, objects))
    return scene, Q_COUNT, str(n), ""


def _number(rng: random.Random) -> str:
    return str(rng.randint(10 ** (READ_DIGITS[0] - 1), 10 ** rng.randint(*READ_DIGITS) - 1))


def _plan_read(rng: random.Random, _: int) -> tuple[Scene, str, str, str]:
    size = rng.choice(READ_SIZES)
    content = _number(rng)
    width, height = Text(content, 0, 0).box[2:]
    pad = 4 * FONT_MODULE
    text = Text(content, rng.randint(pad, size[0] - width - pad), rng.randint(pad, size[1] - height - pad))
    return Scene(size, rng.choice(BACKGROUNDS), (), (text,)), Q_READ, content, ""


def token_scale(width: int, height: int, max_crops: int) -> float:
    """Image tokens per canvas pixel at ``max_crops``: the processor's resize factor over :data:`TOKEN_PX`."""
    return processed_scale(width, height, max_crops) / TOKEN_PX


def crop_grid(width: int, height: int, max_crops: int) -> tuple[float, float, int, int]:
    """(x scale, y scale, left, top): canvas point (x, y) lies at (x * sx + left, y * sy + top) of the padded
    image the processor cuts into crops at ``max_crops``, where every crop's patches sit on one
    :data:`PATCH_PX` grid (crops start every ``window_pixels``, a multiple of it)."""
    margin, window = DEFAULT_VISION.margin_pixels, DEFAULT_VISION.window_pixels
    rows, cols = select_tiling(height - margin, width - margin, window, max_crops)
    new_h, new_w, top, left = fit_box(height, width, (rows * window + margin, cols * window + margin))
    return new_w / width, new_h / height, left, top


def mark_side(width: int, height: int) -> int:
    """Side in px of a detail mark on a ``width x height`` canvas: :data:`MARK_PATCHES` patches at 12 crops."""
    return round(MARK_PATCHES * PATCH_PX / processed_scale(width, height, 12))


def _on_patch_grid(start: float, scale: float, offset: int) -> int:
    """The canvas px nearest ``start`` that the 12-crop resize puts on a patch boundary."""
    return round((round((start * scale + offset) / PATCH_PX) * PATCH_PX - offset) / scale)


def _plan_detail(rng: random.Random, _: int) -> tuple[Scene, str, str, str]:
    """A large circle or hexagon, and inside it a square mark of a colour that is neither its own nor a
    look-alike of it (:data:`LOOKALIKES`), on the 12-crop patch grid (:func:`crop_grid`), at least
    :data:`MARK_MARGIN_TOKENS` 3-crop tokens from the shape's edge (the corners of the mark and its margin
    within 0.866 r, a disc both shapes contain, wherever the grid moves the mark)."""
    size = rng.choice(READ_SIZES)
    side = mark_side(*size)
    sx, sy, left, top = crop_grid(*size, 12)
    snap = PATCH_PX / min(sx, sy) / 2 + 1  # putting the mark on the grid moves it at most this far on each axis
    half = side / 2 + MARK_MARGIN_TOKENS / token_scale(*size, 3) + snap  # the mark, its margin and the move
    r_min, r_max = math.ceil(math.sqrt(2) * half / 0.866), (min(size) - 5) // 2
    r = rng.randint(r_min, r_max)
    cx, cy = rng.randint(r + 2, size[0] - r - 3), rng.randint(r + 2, size[1] - r - 3)
    slack = (0.866 * r - math.sqrt(2) * half) / math.sqrt(2)  # the mark's centre may move this far on each axis
    mx, my = cx + rng.uniform(-slack, slack), cy + rng.uniform(-slack, slack)
    big = rng.choice(list(COLORS))
    small = rng.choice([c for c in COLORS if c != big and c not in LOOKALIKES[big]])  # a contrasting colour
    shape = Shape(rng.choice(DETAIL_SHAPES), big, cx, cy, r)
    mark = Mark(small, _on_patch_grid(mx - side / 2, sx, left), _on_patch_grid(my - side / 2, sy, top), side)
    scene = Scene(size, rng.choice(BACKGROUNDS), (shape,), marks=(mark,))
    return scene, Q_DETAIL.format(shape=shape.kind), small, ""


def sign_sheet(rng: random.Random, max_crops: int) -> Scene:
    """What one crop shows of a reading canvas (:data:`READ_SIZES`) at ``max_crops``, but filled with signs in
    rows, each cut wherever the crop's edge falls: the vision stage's reading views. Its side is the crop's
    (336 px) over the processor's resize factor, so the glyphs come out exactly as large as in that crop."""
    width, height = rng.choice(READ_SIZES)
    side = math.ceil(DEFAULT_VISION.crop_size / processed_scale(width, height, max_crops))
    m = FONT_MODULE
    row_height = (GLYPH_H + 8) * m
    texts, y = [], rng.randint(-row_height // 2, 0)
    while y < side:
        x = rng.randint(-row_height, 0)
        while x < side:
            text = Text(_number(rng), x, y)
            texts.append(text)
            x = sign_box(text)[2] + rng.randint(2 * m, 12 * m)
        y += row_height + rng.randint(0, 4 * m)
    return Scene((side, side), rng.choice(BACKGROUNDS), (), tuple(texts))


def _plan_yesno(rng: random.Random, cycle: int) -> tuple[Scene, str, str, str]:
    """Yes on even cycles; the negative sampling ("random" / "adversarial") alternates every 2 cycles."""
    want_yes = cycle % 2 == 0
    category = ("random", "adversarial")[(cycle // 2) % 2]
    size = rng.choice(SIZES)
    while True:
        pairs = rng.sample(list(itertools.product(SHAPES, COLORS)), rng.randint(2, 4))
        colors = sorted({c for _, c in pairs})
        candidates = colors if want_yes else _negatives(colors, category)
        if candidates:
            break
    scene = Scene(size, rng.choice(BACKGROUNDS), _scatter(rng, size, pairs))
    return scene, Q_YESNO.format(color=rng.choice(candidates)), "yes" if want_yes else "no", category


def _negatives(colors: Sequence[str], category: str) -> list[str]:
    """Absent colours: adversarial ones look like a present one (:data:`LOOKALIKES`), random ones do not."""
    lookalike = {other for c in colors for other in LOOKALIKES[c]}
    absent = [c for c in COLORS if c not in colors]
    return [c for c in absent if (c in lookalike) == (category == "adversarial")]


PLANNERS = {
    "color": _plan_color, "shape": _plan_shape, "count": _plan_count, "read": _plan_read, "yesno": _plan_yesno,
    "detail": _plan_detail,
}  # fmt: skip


def named_color(question: str) -> int:
    """The colour a question names: ``i + 1`` for the ``i``-th of ``COLORS``, 0 for none."""
    words = [t.lower() for t in tokens(question)]
    return next((1 + list(COLORS).index(w) for w in words if w in COLORS), 0)


def questions_about(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question of the suite's forms that has one right answer on ``scene``, as (question, answer,
    qtype), in a shuffled order: the count; the colour of each shape whose kind is unique; the shape of a
    lone object; yes for each present colour and as many no's (absent colours, adversarial and random in
    turn while there are any). A reading scene has only its sign. Training asks several questions of one
    image at the price of one image (see `pretrain`)."""
    if scene.texts:
        (text,) = scene.texts
        return [(Q_READ, text.text, "read")]
    if scene.marks:
        (mark,), (shape,) = scene.marks, scene.shapes
        out = [
            (Q_DETAIL.format(shape=shape.kind), mark.color, "detail"),
            (Q_COLOR.format(shape=shape.kind), shape.color, "color"),
        ]
        rng.shuffle(out)
        return out
    pairs = [(s.kind, s.color) for s in scene.shapes]
    kinds = [k for k, _ in pairs]
    present = sorted({c for _, c in pairs})
    out = [(Q_COUNT, str(len(pairs)), "count")]
    out += [(Q_COLOR.format(shape=k), c, "color") for k, c in pairs if kinds.count(k) == 1]
    if len(pairs) == 1:
        out.append((Q_SHAPE, kinds[0], "shape"))
    out += [(Q_YESNO.format(color=c), "yes", "yesno") for c in present]
    negatives = {category: _negatives(present, category) for category in ("adversarial", "random")}
    for i in range(min(len(present), len(COLORS) - len(present))):
        first, second = ("adversarial", "random")[:: 1 if i % 2 == 0 else -1]
        pool = negatives[first] or negatives[second]
        out.append((Q_YESNO.format(color=pool.pop(rng.randrange(len(pool)))), "no", "yesno"))
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- splits and streams


def split_of(scene: Scene, question: str) -> str:
    """The one split an (image, question) pair belongs to: a fixed hash partition of the parameters."""
    key = (scene, question, scene.marks) if scene.marks else (scene, question)
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return SPLITS[int.from_bytes(digest, "big") % len(SPLITS)]


def make_sample(split: str, seed: int, qtype: str, cycle: int) -> Sample:
    """The ``cycle``-th ``qtype`` sample of a split: its own RNG, redrawn until the pair hashes into ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}/{split}/{qtype}/{cycle}")
    while True:
        scene, question, answer, category = PLANNERS[qtype](rng, cycle)
        if split_of(scene, question) == split:
            break
    return Sample(
        image=render(scene),
        question=question,
        answers=(answer,) * 10,
        answer=answer,
        qtype=qtype,
        sample_id=f"synth-{split}-{seed}-{qtype}-{cycle:06d}",
        scene=scene,
        category=category,
    )


def generate_stream(seed: int, split: str = "train", qtypes: Sequence[str] = QTYPES) -> Iterator[Sample]:
    """Endless samples of a split (training uses "train"); question types cycle in ``qtypes`` order."""
    for cycle in itertools.count():
        for qtype in qtypes:
            yield make_sample(split, seed, qtype, cycle)


def generate(split: str, n: int, seed: int, qtypes: Sequence[str] = QTYPES) -> list[Sample]:
    """The first ``n`` samples of ``generate_stream(seed, split, qtypes)``."""
    return list(itertools.islice(generate_stream(seed, split, qtypes), n))


# --------------------------------------------------------------------------- vocabulary


_TOKEN = re.compile(r"[A-Za-z]+|\d|\?")


def tokens(text: str) -> list[str]:
    """Words, single digits and "?": how :func:`vocabulary` splits questions and answers."""
    return _TOKEN.findall(text)


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every token (see :func:`tokens`) a question or answer can contain, sorted."""
    texts = [Q_SHAPE, Q_COUNT, Q_READ, "yes no", *COLORS, *SHAPES, "0123456789"]
    texts += [Q_COLOR.format(shape=s) for s in SHAPES]
    texts += [Q_YESNO.format(color=c) for c in COLORS]
    texts += [Q_DETAIL.format(shape=s) for s in DETAIL_SHAPES]
    return tuple(sorted({t for text in texts for t in tokens(text)}))


# --------------------------------------------------------------------------- parquet export


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def textvqa_rows(samples: Sequence[Sample], first_id: int = 0) -> list[dict[str, object]]:
    """Rows in the column layout of lmms-eval's textvqa (plus ``qtype``)."""
    rows = []
    for i, s in enumerate(samples):
        rows.append(
            {
                "image_id": s.sample_id,
                "question_id": first_id + i,
                "question": s.question,
                "question_tokens": tokens(s.question),
                "image": {"bytes": _png(s.image), "path": f"{s.sample_id}.png"},
                "image_width": s.image.width,
                "image_height": s.image.height,
                "answers": list(s.answers),
                "image_classes": sorted({shape.kind for shape in s.scene.shapes}),
                "set_name": "val",
                "ocr_tokens": [text.text for text in s.scene.texts],
                "qtype": s.qtype,
            }
        )
    return rows


def pope_rows(samples: Sequence[Sample], first_id: int = 0) -> list[dict[str, object]]:
    """Rows in the column layout of lmms-eval's pope (plus ``qtype``)."""
    return [
        {
            "id": str(first_id + i),
            "question_id": str(first_id + i),
            "question": s.question,
            "answer": s.answer,
            "image_source": s.sample_id,
            "image": {"bytes": _png(s.image), "path": f"{s.sample_id}.png"},
            "category": s.category,
            "qtype": s.qtype,
        }
        for i, s in enumerate(samples)
    ]


def _features(layout: str) -> datasets.Features:
    from datasets import Features, Value
    from datasets import Image as HFImage
    from datasets import Sequence as HFSequence

    strings = HFSequence(Value("string"))
    if layout == "textvqa":
        columns = {
            "image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
            "question_tokens": strings, "image": HFImage(), "image_width": Value("int32"),
            "image_height": Value("int32"), "answers": strings, "image_classes": strings,
            "set_name": Value("string"), "ocr_tokens": strings, "qtype": Value("string"),
        }  # fmt: skip
    elif layout == "pope":
        columns = {
            "id": Value("string"), "question_id": Value("string"), "question": Value("string"),
            "answer": Value("string"), "image_source": Value("string"), "image": HFImage(),
            "category": Value("string"), "qtype": Value("string"),
        }  # fmt: skip
    else:
        raise ValueError(f"layout must be 'textvqa' or 'pope', got {layout!r}")
    return Features(columns)


def write_parquet(samples: Sequence[Sample], path: str | os.PathLike[str], layout: str, first_id: int = 0) -> int:
    """Write samples as a ``datasets`` parquet file in the textvqa or pope layout; returns its size in bytes."""
    import datasets

    rows = textvqa_rows(samples, first_id) if layout == "textvqa" else pope_rows(samples, first_id)
    datasets.Dataset.from_list(rows, features=_features(layout)).to_parquet(str(path))
    return os.path.getsize(path)
