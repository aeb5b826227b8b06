"""Tests of the MolmoE preprocessing against the original implementation's golden outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmms_adaptive.core.processor import (
    DEFAULT_VISION,
    DROPPED,
    MolmoeProcessor,
    SpecialTokens,
    VisionPreprocessConfig,
    format_prompt,
    image_token_count,
    preprocess_image,
    select_tiling,
    to_rgb_array,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"
CHECKPOINT = SHARED / "molmoe-1b-0924"

# Arbitrary distinct ids: geometry tests need no real tokenizer.
FAKE_SPECIAL = SpecialTokens(bos=0, eos=0, pad=1, im_start=2, im_end=3, im_patch=4, im_col=5, image=6)


def _golden_cases() -> list:
    index = GOLDEN / "index.json"
    if not index.is_file():
        return [pytest.param(None, id="no-golden")]
    cases = json.loads(index.read_text())["preprocess"]
    return [pytest.param(case, id=Path(case["file"]).stem) for case in cases]


@pytest.fixture(scope="module")
def processor() -> MolmoeProcessor:
    if not (CHECKPOINT / "tokenizer.json").is_file():
        pytest.skip(f"../shared/molmoe-1b-0924 not found: {CHECKPOINT}")
    return MolmoeProcessor.from_pretrained(CHECKPOINT)


def _noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", _golden_cases())
def test_matches_golden(case: dict | None, processor: MolmoeProcessor) -> None:
    if case is None:
        pytest.skip(f"../shared/golden not found: {GOLDEN}")
    prompt = json.loads((GOLDEN / "index.json").read_text())["prompt"]
    expected = np.load(GOLDEN / case["file"])
    with Image.open(GOLDEN / case["image"]) as image:
        out = processor(prompt, image, max_crops=case["max_crops"])

    np.testing.assert_array_equal(out.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(out.image_input_idx, expected["image_input_idx"])
    assert out.images.shape == expected["images"].shape
    assert np.abs(out.images - expected["images"]).max() <= 1e-5
    assert out.image_masks.shape == expected["image_masks"].shape
    assert np.abs(out.image_masks - expected["image_masks"]).max() <= 1e-5
    assert out.n_tokens == case["n_tokens"]
    assert out.n_crops == case["n_crops"]
    assert int((out.input_ids == processor.special.im_patch).sum()) == case["n_patch_tokens"]
    assert out.input_ids.dtype == np.int64 and out.image_input_idx.dtype == np.int64
    assert out.images.dtype == np.float32 and out.image_masks.dtype == np.float32


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(("max_crops", "patch_tokens"), [(1, 288), (2, 384), (4, 544), (6, 704), (12, 704)])
def test_documented_patch_token_counts(max_crops: int, patch_tokens: int) -> None:
    out = preprocess_image(_noise_image(480, 640), max_crops, DEFAULT_VISION, FAKE_SPECIAL)
    assert int((out.tokens == FAKE_SPECIAL.im_patch).sum()) == patch_tokens
    assert image_token_count(480, 640, max_crops) == len(out.tokens)


@pytest.mark.parametrize(
    ("height", "width", "max_crops"),
    [
        (1, 1, 12),
        (30, 2000, 12),
        (112, 113, 4),
        (336, 336, 12),
        (480, 640, 3),
        (2200, 1700, 6),
        (700, 1500, 9),
        (1200, 1200, 36),
    ],
)
def test_token_count_and_positions_agree_with_pixels(height: int, width: int, max_crops: int) -> None:
    out = preprocess_image(_noise_image(height, width), max_crops, DEFAULT_VISION, FAKE_SPECIAL)
    assert image_token_count(height, width, max_crops) == len(out.tokens)

    n = out.crops.shape[0]
    assert out.crops.shape == (n, 576, 588)
    assert out.token_idx.shape == (n, 144) and out.masks.shape == (n, 576)
    assert (out.masks[-1] == -1).all() and ((out.masks[:-1] >= 0) & (out.masks[:-1] <= 1)).all()
    # Every <im_patch> receives exactly one pooled feature; everything else gets none.
    kept = out.token_idx[out.token_idx != DROPPED]
    np.testing.assert_array_equal(np.sort(kept), np.flatnonzero(out.tokens == FAKE_SPECIAL.im_patch))
    assert (out.token_idx[0] != DROPPED).all()  # the global view keeps all its features


@pytest.mark.parametrize(
    ("height", "width", "max_crops", "expected"),
    [
        (-100, -100, 12, (1, 1)),  # image smaller than the 112 px margin
        (0, 0, 12, (1, 1)),
        (100, 100, 12, (1, 1)),  # needs upscaling anyway: the smallest tiling
        (224, 448, 12, (1, 2)),  # fits exactly
        (10_000, 10_000, 12, (3, 3)),  # huge: most crops, ties to the smaller tiling
        (10_000, 10_000, 15, (3, 3)),  # (3, 4) and (3, 5) are no better
        (10_000, 10_000, 16, (4, 4)),
        (200, 5000, 12, (1, 12)),  # very wide
        (5000, 200, 12, (12, 1)),  # very tall
        (5000, 5000, 1, (1, 1)),
        (368, 528, 12, (2, 3)),  # 640x480 minus margins
        (368, 528, 4, (2, 2)),
    ],
)
def test_select_tiling(height: int, width: int, max_crops: int, expected: tuple[int, int]) -> None:
    assert select_tiling(height, width, 224, max_crops) == expected


def test_select_tiling_rejects_no_crops() -> None:
    with pytest.raises(ValueError, match="max_crops"):
        select_tiling(100, 100, 224, 0)


# --------------------------------------------------------------------------- config


def test_config_from_real_folder_is_default() -> None:
    if not CHECKPOINT.is_dir():
        pytest.skip(f"../shared/molmoe-1b-0924 not found: {CHECKPOINT}")
    assert VisionPreprocessConfig.from_folder(CHECKPOINT) == VisionPreprocessConfig()


def test_config_from_folder(tmp_path: Path) -> None:
    assert VisionPreprocessConfig.from_folder(tmp_path) == VisionPreprocessConfig()
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"max_crops": 6, "overlap_margins": [4, 4], "do_normalize": True}))
    assert VisionPreprocessConfig.from_folder(tmp_path) == VisionPreprocessConfig(max_crops=6)
    path.write_text(json.dumps({"max_crops": "6"}))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json.*'max_crops'"):
        VisionPreprocessConfig.from_folder(tmp_path)
    path.write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="'image_mean'"):
        VisionPreprocessConfig.from_folder(tmp_path)


def test_from_pretrained_requires_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        MolmoeProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- tokens and text


def test_real_tokenizer_special_ids(processor: MolmoeProcessor) -> None:
    assert processor.special == SpecialTokens(
        bos=50279, eos=50279, pad=1, im_start=50280, im_end=50281, im_patch=50282, im_col=50283, image=50284
    )


def test_format_prompt() -> None:
    assert format_prompt("What is in the image?") == " User: What is in the image? Assistant:"
    assert format_prompt("what is written?", style="text_vqa") == " User: text_vqa: what is written? Assistant:"


def test_text_only_request(processor: MolmoeProcessor) -> None:
    out = processor("Hello?", style="vqa2")
    assert out.images is None and out.image_input_idx is None and out.image_masks is None
    assert out.n_crops == 0 and out.n_image_tokens == 0
    assert out.input_ids[0] == processor.special.bos
    assert out.input_ids[1:].tolist() == processor.encode_text(" User: vqa2: Hello? Assistant:")
    assert processor.decode(out.input_ids) == " User: vqa2: Hello? Assistant:"
    with pytest.raises(ValueError, match="max_crops"):
        processor("Hello?", max_crops=0)


def test_several_images(processor: MolmoeProcessor) -> None:
    first, second = _noise_image(300, 500, seed=1), _noise_image(700, 400, seed=2)
    one = processor("q", first, max_crops=4)
    two = processor("q", second, max_crops=4)
    both = processor("q", [first, second], max_crops=4)

    n1 = one.n_image_tokens
    assert both.n_image_tokens == n1 + two.n_image_tokens
    assert both.n_crops == one.n_crops + two.n_crops
    np.testing.assert_array_equal(both.input_ids, np.concatenate([one.input_ids[: 1 + n1], two.input_ids[1:]]))
    np.testing.assert_array_equal(both.images, np.concatenate([one.images, two.images]))
    np.testing.assert_array_equal(both.image_masks, np.concatenate([one.image_masks, two.image_masks]))
    shifted = np.where(two.image_input_idx == DROPPED, DROPPED, two.image_input_idx + n1)
    np.testing.assert_array_equal(both.image_input_idx, np.concatenate([one.image_input_idx, shifted]))
    kept = both.image_input_idx[both.image_input_idx != DROPPED]
    assert (both.input_ids[kept] == processor.special.im_patch).all()


# --------------------------------------------------------------------------- image input


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1"])
def test_pil_modes_equal_rgb_conversion(mode: str) -> None:
    image = Image.fromarray(_noise_image(20, 30)).convert(mode)
    rgb = to_rgb_array(image)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, np.asarray(image.convert("RGB")))


def test_array_input_is_copied_unchanged() -> None:
    array = _noise_image(20, 30)
    rgb = to_rgb_array(array)
    np.testing.assert_array_equal(rgb, array)
    assert rgb is not array


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert image.mode.startswith("I;16")
    np.testing.assert_array_equal(to_rgb_array(image)[0, :, 0], [0, 1, 255])


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), ValueError, "uint8.*float32"),
        (np.zeros((4, 4), dtype=np.uint8), ValueError, r"HxWx3.*\(4, 4\)"),
        (np.zeros((4, 4, 4), dtype=np.uint8), ValueError, r"HxWx3.*\(4, 4, 4\)"),
        (np.zeros((0, 0, 3), dtype=np.uint8), ValueError, "non-empty.*0x0"),
        (Image.new("RGB", (0, 0)), ValueError, "non-empty"),
        ("cat.png", TypeError, "PIL.Image.Image or an HxWx3 uint8.*str"),
    ],
)
def test_bad_images_are_rejected(bad: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        to_rgb_array(bad)
