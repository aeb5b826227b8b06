"""MolmoE-1B image + text preprocessing.

Reproduces the original Molmo Hugging Face processor ("overlap-and-resize-c2" crops) exactly:
the prompt text, the image token layout, the normalised ViT patches, the map from pooled image
features to ``<im_patch>`` positions and the per-patch padding masks.

Per image (see ``preprocess_image``):

1. Pick a tiling of ``rows x cols`` crops (``select_tiling``), resize the image keeping its aspect
   ratio to fit ``rows*224+112 x cols*224+112`` and centre-pad it with black.
2. Cut ``rows*cols`` overlapping 336x336 crops at stride 224 and prepend a global view (the whole
   image resized and padded to 336x336).
3. Every crop yields 12x12 pooled features; of the non-global crops only the features outside the
   overlap margins (except at the image border) are kept, so the kept ones tile the image once.

All arrays are numpy; torch is used only for the antialiased bilinear resize and the normalisation after it
(in place, channels first; the same float32 arithmetic as numpy's).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tokenizers import Tokenizer
from torch import Tensor

DROPPED = -100
"""``image_input_idx`` value of a pooled feature that is not added to any token."""

POOL = 2
"""ViT patches are pooled 2x2 into one LLM token (``image_pooling_h/w`` of MolmoE)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What PIL raises on truncated or corrupt image data, depending on the format and where the damage is.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that swap width and height
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Image preprocessing constants; the defaults are MolmoE-1B-0924's."""

    base_image_input_size: tuple[int, int] = (336, 336)
    image_patch_size: int = 14
    overlap_margins: tuple[int, int] = (4, 4)
    image_token_length_h: int = 12
    image_token_length_w: int = 12
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    max_crops: int = 12

    def __post_init__(self) -> None:
        height, width = self.base_image_input_size
        patch = self.image_patch_size
        if height != width:
            raise ValueError(f"base_image_input_size must be square, got {self.base_image_input_size}")
        if patch < 1 or height % patch:
            raise ValueError(f"image_patch_size {patch} must divide base_image_input_size {height}")
        if any(m < 0 or m % POOL for m in self.overlap_margins):
            raise ValueError(f"overlap_margins must be even and >= 0, got {self.overlap_margins}")
        if (self.image_token_length_h, self.image_token_length_w) != (self.crop_patches // POOL,) * 2:
            raise ValueError(
                f"image_token_length_h/w must be {self.crop_patches // POOL} "
                f"({self.crop_patches} patches pooled {POOL}x{POOL}), "
                f"got {self.image_token_length_h}x{self.image_token_length_w}"
            )
        if self.window_patches < 1:
            raise ValueError(f"overlap_margins {self.overlap_margins} leave no crop window")
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")

    @property
    def crop_size(self) -> int:
        """Side of a ViT crop in pixels (336)."""
        return self.base_image_input_size[0]

    @property
    def crop_patches(self) -> int:
        """Side of a ViT crop in patches (24)."""
        return self.crop_size // self.image_patch_size

    @property
    def margin_patches(self) -> int:
        """Both overlap margins together, in patches (8)."""
        return sum(self.overlap_margins)

    @property
    def window_patches(self) -> int:
        """Side of the part of a crop that no neighbour covers, in patches (16); also the stride."""
        return self.crop_patches - self.margin_patches

    @property
    def window_pixels(self) -> int:
        return self.window_patches * self.image_patch_size

    @property
    def margin_pixels(self) -> int:
        return self.margin_patches * self.image_patch_size

    @classmethod
    def from_folder(cls, folder: str | Path) -> VisionPreprocessConfig:
        """Read ``preprocessor_config.json`` of a checkpoint folder (defaults when it is absent).

        Unknown keys are ignored; a known key with a value of the wrong type raises ValueError.
        """
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        values = {f.name: _parse_field(path, f.name, raw[f.name]) for f in fields(cls) if f.name in raw}
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


_INT_PAIR_FIELDS = ("base_image_input_size", "overlap_margins")
_FLOAT_TRIPLE_FIELDS = ("image_mean", "image_std")


def _parse_field(path: Path, key: str, value: Any) -> Any:
    """Check the JSON type of one config value and convert it to the dataclass field's type."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return is_int(v) or isinstance(v, float)

    if key in _INT_PAIR_FIELDS:
        ok, expected = isinstance(value, list) and len(value) == 2 and all(map(is_int, value)), "2 integers"
    elif key in _FLOAT_TRIPLE_FIELDS:
        ok, expected = isinstance(value, list) and len(value) == 3 and all(map(is_number, value)), "3 numbers"
    else:
        ok, expected = is_int(value), "an integer"
    if not ok:
        raise ValueError(f"{path}: key {key!r} must be {expected}, got {value!r}")
    if isinstance(value, list):
        return tuple(float(v) for v in value) if key in _FLOAT_TRIPLE_FIELDS else tuple(value)
    return value


DEFAULT_VISION = VisionPreprocessConfig()


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens, looked up in the tokenizer by their strings."""

    bos: int
    eos: int
    pad: int
    im_start: int
    im_end: int
    im_patch: int
    im_col: int
    image: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialTokens:
        def token_id(token: str) -> int:
            found = tokenizer.token_to_id(token)
            if found is None:
                raise ValueError(f"tokenizer has no special token {token!r}")
            return found

        end_of_text = token_id("<|endoftext|>")  # MolmoE uses it both as BOS and as EOS
        return cls(
            bos=end_of_text,
            eos=end_of_text,
            pad=token_id("<|padding|>"),
            im_start=token_id("<im_start>"),
            im_end=token_id("<im_end>"),
            im_patch=token_id("<im_patch>"),
            im_col=token_id("<im_col>"),
            image=token_id("<|image|>"),
        )


@dataclass(frozen=True)
class ProcessedRequest:
    """Model inputs of one request (one sequence)."""

    input_ids: np.ndarray  # [L] int64, BOS first
    images: np.ndarray | None  # [T, 576, 588] float32, normalised patches
    image_input_idx: np.ndarray | None  # [T, 144] int64, position in input_ids or DROPPED
    image_masks: np.ndarray | None  # [T, 576] float32, real-pixel fraction per patch
    n_crops: int  # ViT crops incl. global views (0 without image)
    n_image_tokens: int  # tokens of the image part incl. specials

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class PreprocessedImage:
    """Everything one image contributes to a request."""

    crops: np.ndarray  # [n, 576, 588] float32; the global view first
    tokens: np.ndarray  # [n_tok] int64 image tokens incl. specials
    token_idx: np.ndarray  # [n, 144] int64 positions relative to tokens[0], or DROPPED
    masks: np.ndarray  # [n, 576] float32; rows [crop_0 .. crop_{n-2}, all -1]


# --------------------------------------------------------------------------- text


def format_prompt(question: str, style: str | None = None) -> str:
    """The Molmo chat prompt; ``style`` is an eval prefix such as ``"vqa2"`` or ``"text_vqa"``."""
    if style:
        question = f"{style}: {question}"
    return f" User: {question} Assistant:"


# --------------------------------------------------------------------------- image input


def to_rgb_array(image: Any) -> np.ndarray:
    """Return an image as a writable HxWx3 uint8 array, as a viewer shows it.

    A PIL image of any mode is converted like ``image.convert("RGB")`` (alpha dropped), with these
    exceptions: the EXIF orientation is applied (a portrait photo stays upright); 16-bit greyscale (``I;16*``,
    and ``I`` / ``F`` images holding values above 255) is scaled from 0..65535 to 8 bits instead of being
    clipped, and ``F`` images within 0..1 from 0..1; an animated image contributes its first frame. An
    HxWx3 uint8 array is taken as it is. A file that cannot be decoded raises ValueError.
    """
    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image array, got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 image array, got shape {image.shape}")
        rgb = np.array(image)
    else:
        raise TypeError(f"expected a PIL.Image.Image or an HxWx3 uint8 numpy array, got {type(image).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got height x width {rgb.shape[0]}x{rgb.shape[1]}")
    return rgb


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of `to_rgb_array(image)`; for a PIL image without decoding its pixels."""
    if not isinstance(image, Image.Image):
        return to_rgb_array(image).shape[:2]
    try:
        swapped = image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS
    except _DECODE_ERRORS as err:
        raise ValueError(f"the image could not be decoded (truncated or corrupt file?): {err!r}") from err
    return (image.width, image.height) if swapped else (image.height, image.width)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    frame = image.tell()
    try:
        image.seek(0)
        upright = ImageOps.exif_transpose(image)
        if upright.mode in _SIXTEEN_BIT_MODES or upright.mode in ("I", "F"):
            return _grey_to_rgb(np.asarray(upright, dtype=np.float64), upright.mode)
        return np.array(upright.convert("RGB"))
    except _DECODE_ERRORS as err:
        raise ValueError(f"the image could not be decoded (truncated or corrupt file?): {err!r}") from err
    finally:
        image.seek(frame)


def _grey_to_rgb(values: np.ndarray, mode: str) -> np.ndarray:
    """Wide greyscale -> 8 bits: 0..65535 scaled (16-bit data), 0..255 kept, `F` within 0..1 scaled from 0..1."""
    top = float(values.max()) if values.size else 0.0
    if mode == "F" and top <= 1.0:
        scale = 255.0
    elif mode in _SIXTEEN_BIT_MODES or top > 255.0:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- tiling


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """Pick (rows, cols) of crop windows for a ``height x width`` area.

    Candidates are all tilings with at most ``max_crops`` windows, ordered by (crops, rows). Take
    the one needing the smallest upscale >= 1; if every tiling needs a downscale, the one needing
    the least. Arithmetic is float32 as in the original (sizes <= 0 happen for tiny images).
    """
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    tilings = sorted(
        ((rows, cols) for rows in range(1, max_crops + 1) for cols in range(1, max_crops // rows + 1)),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    resolutions = np.array(tilings, dtype=np.float32) * np.float32(window)
    with np.errstate(divide="ignore"):
        scales = (resolutions / np.array([height, width], dtype=np.float32)).min(axis=1)
    fits = scales >= 1  # tilings that need no downscaling: the smallest such; else the least downscaled
    best = int(np.argmin(np.where(fits, scales, np.inf))) if fits.any() else int(np.argmax(scales))
    return tilings[best]


def _image_tiling(height: int, width: int, max_crops: int, cfg: VisionPreprocessConfig) -> tuple[int, int]:
    return select_tiling(height - cfg.margin_pixels, width - cfg.margin_pixels, cfg.window_pixels, max_crops)


def _token_grid(tiling: tuple[int, int], cfg: VisionPreprocessConfig) -> tuple[int, int]:
    """Rows and columns of ``<im_patch>`` tokens for the crops of a tiling (8r+4, 8c+4)."""
    rows, cols = tiling
    return (
        (rows * cfg.window_patches + cfg.margin_patches) // POOL,
        (cols * cfg.window_patches + cfg.margin_patches) // POOL,
    )


def _global_token_count(cfg: VisionPreprocessConfig) -> int:
    return cfg.image_token_length_h * (cfg.image_token_length_w + 1) + 2


def image_token_count(height: int, width: int, max_crops: int, cfg: VisionPreprocessConfig = DEFAULT_VISION) -> int:
    """Number of image tokens (incl. specials) an image of this size produces; no pixel work."""
    grid_h, grid_w = _token_grid(_image_tiling(height, width, max_crops, cfg), cfg)
    return _global_token_count(cfg) + grid_h * (grid_w + 1) + 2


def crop_count(height: int, width: int, max_crops: int, cfg: VisionPreprocessConfig = DEFAULT_VISION) -> int:
    """Number of ViT crops (the tiling's plus the global view) an image of this size produces; no pixel work."""
    rows, cols = _image_tiling(height, width, max_crops, cfg)
    return rows * cols + 1


def _image_tokens(tiling: tuple[int, int], cfg: VisionPreprocessConfig, special: SpecialTokens) -> np.ndarray:
    """``<im_start>`` rows-of-(patches, ``<im_col>``) ``<im_end>``, for the global view then the crops."""

    def block(rows: int, cols: int) -> list[int]:
        row = [special.im_patch] * cols + [special.im_col]
        return [special.im_start] + row * rows + [special.im_end]

    tokens = block(cfg.image_token_length_h, cfg.image_token_length_w) + block(*_token_grid(tiling, cfg))
    return np.array(tokens, dtype=np.int64)


def _kept_pooled(index: int, count: int, length: int, margins: tuple[int, int]) -> np.ndarray:
    """Which of a crop's ``length`` pooled rows (or columns) are kept along one axis.

    Crop ``index`` of ``count`` drops the pooled units inside its overlap margins, except on the
    side where it touches the image border.
    """
    keep = np.ones(length, dtype=bool)
    if index > 0:
        keep[: margins[0] // POOL] = False
    if index < count - 1:
        keep[length - margins[1] // POOL :] = False
    return keep


def _token_positions(tiling: tuple[int, int], cfg: VisionPreprocessConfig) -> np.ndarray:
    """[1 + rows*cols, 144] position of each pooled feature's ``<im_patch>`` in the image tokens.

    Crop (i, j) starts ``window_patches / 2`` pooled units after its neighbour, so its local pooled
    cell (y, x) is cell (i*step + y, j*step + x) of the crops' token grid.
    """
    rows, cols = tiling
    th, tw = cfg.image_token_length_h, cfg.image_token_length_w
    local_y, local_x = np.arange(th)[:, None], np.arange(tw)[None, :]
    global_view = 1 + local_y * (tw + 1) + local_x  # after <im_start>

    step = cfg.window_patches // POOL
    grid_w = _token_grid(tiling, cfg)[1]
    crops_start = _global_token_count(cfg) + 1  # after the global block and the crops' <im_start>
    positions = [global_view.ravel()]
    for i, j in np.ndindex(rows, cols):
        cell = crops_start + (i * step + local_y) * (grid_w + 1) + (j * step + local_x)
        keep = (
            _kept_pooled(i, rows, th, cfg.overlap_margins)[:, None]
            & _kept_pooled(j, cols, tw, cfg.overlap_margins)[None, :]
        )
        positions.append(np.where(keep, cell, DROPPED).ravel())
    return np.stack(positions).astype(np.int64)


# --------------------------------------------------------------------------- pixels


def _resize_bilinear(rgb: np.ndarray, height: int, width: int) -> Tensor:
    """Antialiased bilinear resize of uint8 RGB [H, W, 3], computed in float32 on [0, 1] and clipped; [3, h, w]."""
    pixels = torch.from_numpy(np.divide(rgb, np.float32(255), dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)[0]


def fit_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): where an image lands when fitted into ``size`` keeping its aspect and
    centred. Scale arithmetic is float32 like the original; a side that would shrink to 0 pixels is kept
    at 1 (the original fails there)."""
    out_h, out_w = size
    scale = min(np.float32(out_h) / np.float32(height), np.float32(out_w) / np.float32(width))
    new_h = max(1, int(np.float32(height) * scale))
    new_w = max(1, int(np.float32(width) * scale))
    return new_h, new_w, (out_h - new_h) // 2, (out_w - new_w) // 2


def resize_and_pad(
    rgb: np.ndarray, size: tuple[int, int], cfg: VisionPreprocessConfig = DEFAULT_VISION
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``rgb`` into ``size`` keeping its aspect, centre-pad with black, then normalise.

    Returns the normalised [H, W, 3] float32 image (padding becomes ``-mean/std``) and a boolean
    [H, W] mask of the real pixels (geometry: :func:`fit_box`).
    """
    out_h, out_w = size
    new_h, new_w, top, left = fit_box(*rgb.shape[:2], size)
    canvas = torch.zeros(3, out_h, out_w)  # channels first: the resize writes and normalises in place
    canvas[:, top : top + new_h, left : left + new_w] = _resize_bilinear(rgb, new_h, new_w)
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (cfg.image_mean, cfg.image_std))
    canvas.sub_(mean).div_(std)
    mask = np.zeros((out_h, out_w), dtype=bool)
    mask[top : top + new_h, left : left + new_w] = True
    return canvas.permute(1, 2, 0).contiguous().numpy(), mask


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C]: patches row-major, each flattened as (dy, dx, c)."""
    *lead, height, width, channels = pixels.shape
    grid = pixels.reshape(*lead, height // patch, patch, width // patch, patch, channels)
    grid = np.swapaxes(grid, -4, -3)  # [..., H/p, W/p, dy, dx, c]
    return grid.reshape(*lead, (height // patch) * (width // patch), patch * patch * channels)


def _cut_crops(pixels: np.ndarray, tiling: tuple[int, int], cfg: VisionPreprocessConfig) -> np.ndarray:
    """[rows*cols, crop, crop, ...] overlapping crops, row-major, at stride ``window_pixels``."""
    stride, size = cfg.window_pixels, cfg.crop_size
    return np.stack(
        [pixels[i * stride : i * stride + size, j * stride : j * stride + size] for i, j in np.ndindex(*tiling)]
    )


def preprocess_image(
    rgb: np.ndarray, max_crops: int, cfg: VisionPreprocessConfig, special: SpecialTokens
) -> PreprocessedImage:
    """Crops, tokens, feature positions and masks of one HxWx3 uint8 image."""
    height, width = rgb.shape[:2]
    tiling = _image_tiling(height, width, max_crops, cfg)
    rows, cols = tiling
    target = (rows * cfg.window_pixels + cfg.margin_pixels, cols * cfg.window_pixels + cfg.margin_pixels)
    pixels, mask = resize_and_pad(rgb, target, cfg)
    global_view, _ = resize_and_pad(rgb, cfg.base_image_input_size, cfg)

    patch = cfg.image_patch_size
    crops = patchify(np.concatenate([global_view[None], _cut_crops(pixels, tiling, cfg)]), patch)
    crop_masks = patchify(_cut_crops(mask, tiling, cfg)[..., None].astype(np.float32), patch).mean(axis=-1)
    # The original lists the masks of crops 0..n-1 and then a -1 row, while `crops` starts with the
    # global view: masks[k] belongs to crops[k + 1]. The model was trained with this shift.
    masks = np.concatenate([crop_masks, np.full((1, crop_masks.shape[1]), -1.0, dtype=np.float32)])
    return PreprocessedImage(
        crops=crops,
        tokens=_image_tokens(tiling, cfg, special),
        token_idx=_token_positions(tiling, cfg),
        masks=masks,
    )


# --------------------------------------------------------------------------- processor


class MolmoeProcessor:
    """Turns a question and images into MolmoE model inputs."""

    def __init__(self, tokenizer: Tokenizer, vision: VisionPreprocessConfig = DEFAULT_VISION) -> None:
        self.tokenizer = tokenizer
        tokenizer.encode_special_tokens = True  # text spelling "<im_patch>" is text, never a control id
        self.vision = vision
        self.special = SpecialTokens.from_tokenizer(tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MolmoeProcessor:
        """Load ``tokenizer.json`` (required) and ``preprocessor_config.json`` (optional)."""
        tokenizer_path = Path(folder) / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_path}")
        vision = VisionPreprocessConfig.from_folder(folder)
        try:
            return cls(Tokenizer.from_file(str(tokenizer_path)), vision)
        except Exception as err:  # the tokenizers library raises its own exception type for a bad file
            raise ValueError(f"{tokenizer_path}: not a usable tokenizer ({err})") from err

    def encode_text(self, text: str) -> list[int]:
        """Token ids of user text. Special tokens spelled in it are encoded as the text they are, so user
        text never yields a control id; lone surrogates (not Unicode) become U+FFFD."""
        return self.tokenizer.encode(_LONE_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens; negative ids (padding -1, DROPPED) are skipped."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=True)

    def __call__(
        self,
        question: str,
        images: Sequence[Any] | Any | None = None,
        max_crops: int | None = None,
        style: str | None = None,
    ) -> ProcessedRequest:
        """BOS, then each image's tokens in order, then the prompt text."""
        crops_cap = self.vision.max_crops if max_crops is None else max_crops
        if crops_cap < 1:
            raise ValueError(f"max_crops must be >= 1, got {crops_cap}")
        text = np.array(self.encode_text(format_prompt(question, style)), dtype=np.int64)
        processed = [
            preprocess_image(to_rgb_array(image), crops_cap, self.vision, self.special)
            for image in _as_image_list(images)
        ]
        bos = np.array([self.special.bos], dtype=np.int64)
        if not processed:
            return ProcessedRequest(np.concatenate([bos, text]), None, None, None, n_crops=0, n_image_tokens=0)

        starts = 1 + np.cumsum([0] + [len(p.tokens) for p in processed[:-1]])
        image_input_idx = [
            np.where(p.token_idx == DROPPED, DROPPED, p.token_idx + start)
            for p, start in zip(processed, starts, strict=True)
        ]
        crops = np.concatenate([p.crops for p in processed])
        image_tokens = np.concatenate([p.tokens for p in processed])
        return ProcessedRequest(
            input_ids=np.concatenate([bos, image_tokens, text]),
            images=crops,
            image_input_idx=np.concatenate(image_input_idx),
            image_masks=np.concatenate([p.masks for p in processed]),
            n_crops=int(crops.shape[0]),
            n_image_tokens=int(image_tokens.shape[0]),
        )


def _as_image_list(images: Sequence[Any] | Any | None) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
