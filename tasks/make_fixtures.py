"""Generate the small offline fixtures used by the ``*_local`` lmms-eval tasks.

Run from anywhere:

    python tasks/make_fixtures.py            # rewrite the committed files
    python tasks/make_fixtures.py OUT_DIR    # write them somewhere else (used by the tests)

It rewrites ``textvqa_val_local.parquet``, ``mme_local.parquet`` and
``pope_local.parquet`` next to this script.  Everything is drawn with PIL from
fixed coordinates (no randomness beyond a seeded ``random.Random`` used for
decorative noise dots), so re-running it gives identical content; with the same
Pillow / datasets / pyarrow versions the files are byte-identical.

The images are synthetic but every question has a real answer that can be read
off the picture (a printed word or number, a count of shapes, a colour, a
position).  Sizes vary on purpose (320x240 ... 1024x384, one tall 480x900) so a
model's image-cropping / tiling code sees several aspect ratios.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))

SEED = 1234

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "grey": (128, 128, 128),
}


# --------------------------------------------------------------------------- drawing helpers


def font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable default font (needs FreeType, which the wheels include).
    return ImageFont.load_default(size=size)


def canvas(size: tuple[int, int], bg=WHITE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", size, bg)
    return img, ImageDraw.Draw(img)


def centred_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, size: int, fill=BLACK) -> None:
    x0, y0, x1, y1 = box
    f = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    w, h = right - left, bottom - top
    draw.text((x0 + (x1 - x0 - w) / 2 - left, y0 + (y1 - y0 - h) / 2 - top), text, font=f, fill=fill)


def shape(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, r: int, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=BLACK, width=2)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=BLACK, width=2)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=BLACK)
    elif kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill, outline=BLACK)
    else:
        raise ValueError(kind)


def noise_dots(img: Image.Image, rng: random.Random, n: int = 40) -> None:
    """A few faint grey dots so images are not perfectly flat (seeded, deterministic)."""
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(n):
        x, y = rng.randrange(w), rng.randrange(h)
        d.point((x, y), fill=(200, 200, 200))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image_cell(img: Image.Image, name: str) -> dict[str, object]:
    # the storage layout of the `datasets` Image feature
    return {"bytes": png_bytes(img), "path": name}


# --------------------------------------------------------------------------- scene painters


def sign(size, word, bg=(250, 245, 230), fg=BLACK, board=None, text_size=None):
    """A big printed word/number, optionally on a coloured board."""
    img, d = canvas(size, bg)
    w, h = size
    box = (w // 8, h // 4, w - w // 8, h - h // 4)
    if board is not None:
        d.rounded_rectangle(box, radius=min(w, h) // 20, fill=board, outline=BLACK, width=3)
    centred_text(d, box, word, text_size or max(24, min(w, h) // 4), fill=fg)
    return img


def shapes_scene(size, items: list[tuple[str, str, float, float, float]], bg=WHITE):
    """items: (kind, colour name, x frac, y frac, radius frac of min side)."""
    img, d = canvas(size, bg)
    w, h = size
    m = min(w, h)
    for kind, colour, fx, fy, fr in items:
        shape(d, kind, int(fx * w), int(fy * h), int(fr * m), COLOURS[colour])
    return img


def row_of(size, kind, colour, n, bg=WHITE, y=0.5):
    xs = [(i + 1) / (n + 1) for i in range(n)]
    return shapes_scene(size, [(kind, colour, x, y, 0.5 / (n + 2)) for x in xs], bg=bg)


def traffic_light(size, lit: str):
    img, d = canvas(size, (190, 220, 250))
    w, h = size
    bw, bh = w // 3, int(h * 0.7)
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    d.rectangle((x0 + bw // 2 - 8, y0 + bh, x0 + bw // 2 + 8, h), fill=(60, 60, 60))
    d.rounded_rectangle((x0, y0, x0 + bw, y0 + bh), radius=20, fill=(40, 40, 40))
    r = min(bw, bh // 3) // 2 - 10
    for i, name in enumerate(["red", "yellow", "green"]):
        cy = y0 + bh * (2 * i + 1) // 6
        fill = COLOURS[name] if name == lit else (70, 70, 70)
        d.ellipse((x0 + bw // 2 - r, cy - r, x0 + bw // 2 + r, cy + r), fill=fill)
    return img


def two_lines(size, top: str, bottom: str, bg=(245, 245, 255), mono=False):
    img, d = canvas(size, bg)
    w, h = size
    ts = max(22, min(w, h) // 7)
    centred_text(d, (0, 0, w, h // 2), top, ts)
    centred_text(d, (0, h // 2, w, h), bottom, ts, fill=(90, 90, 90))
    return img


def code_card(size, lines: list[str]):
    img, d = canvas(size, (30, 30, 40))
    w, h = size
    f = font(max(18, h // (len(lines) + 3)))
    y = h // (len(lines) + 2)
    for ln in lines:
        d.text((w // 12, y), ln, font=f, fill=(220, 240, 200))
        y += h // (len(lines) + 2)
    return img


# --------------------------------------------------------------------------- TextVQA


def textvqa_rows(rng: random.Random) -> list[dict[str, object]]:
    # (size, painter, question, answer list of 10 (realistic annotator disagreement), ocr tokens, classes)
    specs: list[tuple[tuple[int, int], Callable[[], Image.Image], str, list[str], list[str], list[str]]] = [
        (
            (640, 480),
            lambda: sign((640, 480), "STOP", bg=(200, 220, 200), fg=WHITE, board=COLOURS["red"]),
            "what word is written on the sign?",
            ["stop"] * 9 + ["stop sign"],
            ["STOP"],
            ["Traffic sign"],
        ),
        (
            (320, 240),
            lambda: sign((320, 240), "42", board=COLOURS["yellow"]),
            "what number is shown?",
            ["42"] * 8 + ["forty two", "42."],
            ["42"],
            ["Number"],
        ),
        (
            (800, 600),
            lambda: sign((800, 600), "OPEN", bg=(60, 60, 60), fg=COLOURS["green"], board=BLACK),
            "what does the sign say?",
            ["open"] * 10,
            ["OPEN"],
            ["Sign"],
        ),
        (
            (480, 900),
            lambda: two_lines((480, 900), "EXIT", "Gate 7"),
            "what gate number is shown?",
            ["7"] * 7 + ["gate 7"] * 3,
            ["EXIT", "Gate", "7"],
            ["Sign", "Door"],
        ),
        (
            (1024, 384),
            lambda: sign((1024, 384), "CAFE", bg=(250, 240, 220), board=(180, 120, 70), fg=WHITE),
            "what is the name of the shop?",
            ["cafe"] * 9 + ["coffee"],
            ["CAFE"],
            ["Building", "Sign"],
        ),
        (
            (640, 480),
            lambda: sign((640, 480), "2024", board=(220, 235, 255)),
            "what year is written here?",
            ["2024"] * 10,
            ["2024"],
            ["Calendar"],
        ),
        (
            (320, 240),
            lambda: sign((320, 240), "A7", fg=COLOURS["blue"]),
            "what is the seat number?",
            ["a7"] * 9 + ["7"],
            ["A7"],
            ["Ticket"],
        ),
        (
            (800, 600),
            lambda: two_lines((800, 600), "MILK", "1 LITRE"),
            "what product is this?",
            ["milk"] * 10,
            ["MILK", "1", "LITRE"],
            ["Bottle", "Food"],
        ),
        (
            (480, 900),
            lambda: sign((480, 900), "SALE", bg=WHITE, board=COLOURS["orange"], fg=WHITE),
            "what is written in the orange box?",
            ["sale"] * 10,
            ["SALE"],
            ["Poster"],
        ),
        (
            (640, 480),
            lambda: two_lines((640, 480), "PLATFORM", "9"),
            "what platform number is it?",
            ["9"] * 8 + ["nine", "platform 9"],
            ["PLATFORM", "9"],
            ["Sign"],
        ),
        (
            (1024, 384),
            lambda: sign((1024, 384), "BOOKS", board=COLOURS["purple"], fg=WHITE),
            "what kind of store is advertised?",
            ["books"] * 6 + ["book store"] * 2 + ["bookstore"] * 2,
            ["BOOKS"],
            ["Sign"],
        ),
        (
            (320, 240),
            lambda: sign((320, 240), "5 km", bg=(230, 255, 230), board=COLOURS["green"], fg=WHITE),
            "how far is it?",
            ["5 km"] * 7 + ["5"] * 2 + ["5km"],
            ["5", "km"],
            ["Road sign"],
        ),
    ]
    rows = []
    for i, (size, paint, q, answers, ocr, classes) in enumerate(specs):
        assert len(answers) == 10
        img = paint()
        noise_dots(img, rng)
        image_id = f"local{i:04d}"
        rows.append(
            {
                "image_id": image_id,
                "question_id": 90000 + i,
                "question": q,
                "question_tokens": q.rstrip("?").split() + ["?"],
                "image": image_cell(img, f"{image_id}.png"),
                "image_width": size[0],
                "image_height": size[1],
                "answers": answers,
                "image_classes": classes,
                "set_name": "val",
                "ocr_tokens": ocr,
            }
        )
    return rows


# --------------------------------------------------------------------------- MME


def mme_rows(rng: random.Random) -> list[dict[str, object]]:
    sfx = " Please answer yes or no."
    # (category, image file name, painter, yes-question, no-question)
    specs = [
        (
            "existence",
            "existence/0001.png",
            lambda: shapes_scene((640, 480), [("circle", "red", 0.3, 0.5, 0.15), ("square", "blue", 0.7, 0.5, 0.15)]),
            "Is there a red circle in this image?",
            "Is there a green triangle in this image?",
        ),
        (
            "existence",
            "existence/0002.png",
            lambda: shapes_scene((320, 240), [("star", "yellow", 0.5, 0.5, 0.35)], bg=(20, 20, 60)),
            "Is there a star in this image?",
            "Is there a square in this image?",
        ),
        (
            "count",
            "count/0001.png",
            lambda: row_of((800, 600), "circle", "blue", 3),
            "Are there three circles in this image?",
            "Are there five circles in this image?",
        ),
        (
            "count",
            "count/0002.png",
            lambda: row_of((480, 900), "square", "green", 2, y=0.5),
            "Are there two squares in the image?",
            "Are there four squares in the image?",
        ),
        (
            "position",
            "position/0001.png",
            lambda: shapes_scene((1024, 384), [("circle", "red", 0.2, 0.5, 0.3), ("triangle", "blue", 0.8, 0.5, 0.3)]),
            "Is the red circle on the left side of the image?",
            "Is the red circle on the right side of the image?",
        ),
        (
            "color",
            "color/0001.png",
            lambda: shapes_scene((640, 480), [("square", "green", 0.5, 0.5, 0.3)]),
            "Is the square in the image green?",
            "Is the square in the image red?",
        ),
        (
            "color",
            "color/0002.png",
            lambda: shapes_scene((320, 240), [("triangle", "purple", 0.5, 0.55, 0.35)]),
            "Is the triangle purple?",
            "Is the triangle yellow?",
        ),
        (
            "OCR",
            "OCR/0001.png",
            lambda: sign((800, 600), "HELLO", board=(220, 235, 255)),
            'Is the word in the image "HELLO"?',
            'Is the word in the image "WORLD"?',
        ),
        (
            "commonsense_reasoning",
            "commonsense_reasoning/0001.png",
            lambda: traffic_light((480, 900), "red"),
            "Should a car stop when it sees this traffic light?",
            "Can a car drive on when it sees this traffic light?",
        ),
        (
            "numerical_calculation",
            "numerical_calculation/0001.png",
            lambda: sign((640, 480), "7 + 5 = ?", board=WHITE, text_size=72),
            "Is the answer to the arithmetic question in the image 12?",
            "Is the answer to the arithmetic question in the image 13?",
        ),
        (
            "text_translation",
            "text_translation/0001.png",
            lambda: sign((800, 600), "ROUGE", board=(255, 230, 230)),
            "Is it appropriate to translate the French word in the image into English as 'red'?",
            "Is it appropriate to translate the French word in the image into English as 'blue'?",
        ),
        (
            "code_reasoning",
            "code_reasoning/0001.png",
            lambda: code_card((640, 480), ["a = 2", "b = 3", "print(a * b)"]),
            "The image shows a python code. Is the output of the code '6'?",
            "The image shows a python code. Is the output of the code '5'?",
        ),
    ]
    rows = []
    for category, qid, paint, q_yes, q_no in specs:
        img = paint()
        noise_dots(img, rng)
        cell = image_cell(img, os.path.basename(qid))
        rows.append({"question_id": qid, "image": cell, "question": q_yes + sfx, "answer": "Yes", "category": category})
        rows.append({"question_id": qid, "image": cell, "question": q_no + sfx, "answer": "No", "category": category})
    return rows


# --------------------------------------------------------------------------- POPE


def pope_rows(rng: random.Random) -> list[dict[str, object]]:
    scenes = {
        "1001": (
            (640, 480),
            [("circle", "red", 0.25, 0.4, 0.12), ("square", "blue", 0.6, 0.6, 0.12), ("star", "yellow", 0.8, 0.3, 0.1)],
        ),
        "1002": ((800, 600), [("triangle", "green", 0.3, 0.5, 0.15), ("triangle", "orange", 0.7, 0.5, 0.15)]),
        "1003": ((320, 240), [("square", "purple", 0.5, 0.5, 0.3)]),
        "1004": ((480, 900), [("circle", "blue", 0.5, 0.25, 0.3), ("star", "red", 0.5, 0.7, 0.3)]),
        "1005": (
            (1024, 384),
            [
                ("circle", "green", 0.15, 0.5, 0.3),
                ("square", "yellow", 0.5, 0.5, 0.3),
                ("triangle", "red", 0.85, 0.5, 0.3),
            ],
        ),
        "1006": ((640, 480), [("star", "purple", 0.5, 0.5, 0.35)]),
    }
    # (image, object asked about, answer, POPE sampling strategy)
    qs = [
        ("1001", "circle", "yes", "random"),
        ("1001", "triangle", "no", "adversarial"),
        ("1002", "triangle", "yes", "popular"),
        ("1002", "star", "no", "random"),
        ("1003", "square", "yes", "adversarial"),
        ("1003", "circle", "no", "popular"),
        ("1004", "star", "yes", "random"),
        ("1004", "square", "no", "adversarial"),
        ("1005", "triangle", "yes", "popular"),
        ("1005", "star", "no", "popular"),
        ("1006", "star", "yes", "adversarial"),
        ("1006", "triangle", "no", "random"),
    ]
    images = {}
    for src, (size, items) in scenes.items():
        img = shapes_scene(size, items)
        noise_dots(img, rng)
        images[src] = image_cell(img, f"{src}.png")
    rows = []
    for i, (src, obj, ans, cat) in enumerate(qs):
        rows.append(
            {
                "id": str(i),
                "question_id": str(i + 1),
                "question": f"Is there a {obj} in the image?",
                "answer": ans,
                "image_source": src,
                "image": images[src],
                "category": cat,
            }
        )
    return rows


# --------------------------------------------------------------------------- writing


def write(rows: list[dict[str, object]], features, path: str) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows, features=features)
    ds.to_parquet(path)
    print(f"wrote {path}: {len(ds)} rows, {os.path.getsize(path)} bytes")


def main(out_dir: str = HERE) -> None:
    from datasets import Features, Sequence, Value
    from datasets import Image as HFImage

    rng = random.Random(SEED)

    textvqa_features = Features(
        {
            "image_id": Value("string"),
            "question_id": Value("int32"),
            "question": Value("string"),
            "question_tokens": Sequence(Value("string")),
            "image": HFImage(),
            "image_width": Value("int32"),
            "image_height": Value("int32"),
            "answers": Sequence(Value("string")),
            "image_classes": Sequence(Value("string")),
            "set_name": Value("string"),
            "ocr_tokens": Sequence(Value("string")),
        }
    )
    mme_features = Features(
        {
            "question_id": Value("string"),
            "image": HFImage(),
            "question": Value("string"),
            "answer": Value("string"),
            "category": Value("string"),
        }
    )
    pope_features = Features(
        {
            "id": Value("string"),
            "question_id": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "image_source": Value("string"),
            "image": HFImage(),
            "category": Value("string"),
        }
    )

    # one shared RNG, consumed in this fixed order: keep the order to keep the files stable
    write(textvqa_rows(rng), textvqa_features, os.path.join(out_dir, "textvqa_val_local.parquet"))
    write(mme_rows(rng), mme_features, os.path.join(out_dir, "mme_local.parquet"))
    write(pope_rows(rng), pope_features, os.path.join(out_dir, "pope_local.parquet"))


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else HERE)
