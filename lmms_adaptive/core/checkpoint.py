"""Checkpoint folders: resolve a folder or a Hugging Face hub id, find, validate and load weights
(pickle-free), save and convert to safetensors; where the shipped default lives; the block ranking stored
beside the weights.

A folder holds `config.json`, the tokenizer files and weights as one of:
`model.safetensors`, `model.safetensors.index.json` + shards, or `pytorch_model.bin` (the official
MolmoE release: one fp32 pickle, read with `weights_only=True, mmap=True`, never a full unpickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import MolmoeForCausalLM

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
# Files copied next to the weights by `convert` (whichever exist).
SIDE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip
SHARD_BYTES = 5 * 1024**3
# What a hub snapshot fetches: every JSON file (config, tokenizer, preprocessor, the safetensors index, and
# our own block ranking, latency estimator and controllers/ artifacts) and the safetensors weights; the
# pickle only when the repository has no safetensors. Never the remote-code python files.
HUB_PATTERNS = ("*.json", "*.safetensors")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# The embedded default: a tiny MolmoE trained on the synthetic suite, shipped as package data
# (built by `python -m lmms_adaptive.default.pretrain`; nothing here imports that code).
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "resources" / "tiny-molmoe-synth"
IMPORTANCE_FILE = "block_importance.json"


class CheckpointError(ValueError):
    """A weights folder that cannot be loaded as this model: says which file and which tensors."""


def resolve_checkpoint(pretrained: str | Path | None, revision: str | None = None) -> Path:
    """The local folder of `pretrained`: None is the built-in model; an existing folder is returned as is; a
    hub id (`owner/name`, at `revision`, default main) goes through the Hugging Face cache: downloaded on first
    use, read from the cache offline (`HF_HUB_OFFLINE=1`). Raises FileNotFoundError naming the id, the
    revision and the cache folder."""
    if pretrained is None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} needs a hub id as pretrained (owner/name)")
        return default_checkpoint()
    path = Path(pretrained)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids only; {path} is a local folder")
        return path
    if not HUB_ID.fullmatch(str(pretrained)):
        raise FileNotFoundError(f"checkpoint folder not found: {path} (nor is it a hub id owner/name)")
    cache = hub_constants.HF_HUB_CACHE
    where = f"hub id {pretrained} (revision {revision or 'main'}, cache {cache}"
    where += ", offline: HF_HUB_OFFLINE=1)" if hub_constants.HF_HUB_OFFLINE else ")"
    try:
        folder = Path(huggingface_hub.snapshot_download(pretrained, revision=revision, allow_patterns=HUB_PATTERNS))
        if not _has_weights(folder):
            folder = Path(huggingface_hub.snapshot_download(pretrained, revision=revision, allow_patterns=PICKLE))
    except (OSError, HFValidationError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"checkpoint not found: not a local folder, and {where} failed: {reason}") from err
    if not _has_weights(folder):
        raise FileNotFoundError(f"{where}: snapshot {folder} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")
    log.info("%s -> %s", where, folder)
    return folder


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX, PICKLE))


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, in load order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if (folder / SAFETENSORS_INDEX).is_file():
        index_path = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object ({err})") from err
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names shards that do not exist: {', '.join(missing)}")
        return shards
    for name in (SAFETENSORS, PICKLE):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} + shards, or {PICKLE}"
    )


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every weight file, lazily (memory-mapped where the format allows)."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        yield name, f.get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupted?): {err}") from err
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises several types for bad zips and disallowed pickles
                raise CheckpointError(
                    f"{path}: unreadable PyTorch checkpoint (truncated, corrupted or not a state dict): {err}"
                ) from err
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
                yield name, value


def _check_names(expected: dict[str, torch.Size], found: dict[str, torch.Size], folder: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    if not (missing or unexpected or misshaped):
        return

    def listing(names: list[str], show=lambda n: n) -> str:
        head = ", ".join(show(n) for n in names[:8])
        return head + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {listing(unexpected)}")
    if misshaped:
        parts.append(
            f"mis-shaped {len(misshaped)}: "
            + listing(misshaped, lambda n: f"{n} (checkpoint {list(found[n])}, config expects {list(expected[n])})")
        )
    raise CheckpointError(f"weights in {folder} do not match its config.json: " + "; ".join(parts))


def build_model(
    config: MolmoeConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MolmoeForCausalLM:
    """Allocate an uninitialised model (no random init work) on `device`, directly in `dtype` (cast while
    still on the meta device: the full model in bf16 never passes through a 29 GB fp32 copy)."""
    with torch.device("meta"):
        model = MolmoeForCausalLM(config).to(dtype)
    return model.to_empty(device=device)


def load_weights(model: MolmoeForCausalLM, folder: str | Path) -> None:
    """Strictly load a folder's weights into `model` (casting to its dtype and device).

    Names and shapes are checked against the model before any data is read. Safetensors are read tensor by
    tensor straight into the model's own storage (a temporary only where dtype, device or layout differ),
    so loading holds about one copy of the weights: peak memory stays near the model's size plus one tensor.
    """
    folder = Path(folder)
    slots = model.weight_slots()
    expected = {name: t.shape for name, t in slots.items()}
    files = weight_files(folder)
    if files[0].suffix != ".safetensors":
        _load_pickle(slots, expected, folder)
        return
    stored = {path: stored_tensors(path) for path in files}
    _check_names(expected, {n: torch.Size(t.shape) for s in stored.values() for n, t in s.items()}, folder)
    with torch.no_grad():
        for path, tensors in stored.items():
            with path.open("rb") as f:
                for name, where in tensors.items():
                    _read_into(f, where, slots[name])
                    if not all_finite(slots[name]):
                        raise CheckpointError(f"weights in {folder}: tensor {name} holds NaN or infinite values")
                _drop_page_cache(f)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t` (any integer tensor passes). Through its min and max, which carry NaN and
    infinities along: several times faster than `isfinite` on bf16 weights on a CPU."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _load_pickle(slots: dict[str, torch.Tensor], expected: dict[str, torch.Size], folder: Path) -> None:
    found: dict[str, torch.Size] = {}
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(folder):
        found[name] = tensor.shape
        if name in slots and tuple(slots[name].shape) == tuple(tensor.shape):
            if not all_finite(tensor):
                raise CheckpointError(f"weights in {folder}: tensor {name} holds NaN or infinite values")
            pending[name] = tensor
    _check_names(expected, found, folder)
    with torch.no_grad():
        for name, tensor in pending.items():
            slots[name].copy_(tensor)


# safetensors dtype names -> torch dtypes (the format's header spells them this way)
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Read a safetensors file's header (names, dtypes, shapes, byte ranges) without reading its data; a header
    that is malformed or points past the end of the file (truncated) raises CheckpointError naming the file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(v) for v in entry["data_offsets"])
            tensor = StoredTensor(
                SAFETENSORS_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"]), 8 + n + begin, end - begin
            )
            numel = math.prod(tensor.shape)
            if end - begin != numel * tensor.dtype.itemsize or tensor.offset + tensor.nbytes > size:
                raise ValueError(
                    f"tensor {name}: bytes {begin}..{end} do not hold {entry['dtype']} {list(tensor.shape)} in the file"
                )
            out[name] = tensor
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupted?): {err}") from err
    return out


def _read_into(f, where: StoredTensor, dest: torch.Tensor) -> None:
    """Read one stored tensor into `dest`: straight into its memory when it is a contiguous CPU tensor of the
    stored dtype, else through a temporary of that one tensor (cast / copied to the device)."""
    direct = dest.device.type == "cpu" and dest.dtype == where.dtype and dest.is_contiguous()
    target = dest if direct else torch.empty(where.shape, dtype=where.dtype)
    f.seek(where.offset)
    if where.nbytes and f.readinto(memoryview(target.detach().view(-1).view(torch.uint8).numpy())) != where.nbytes:
        raise CheckpointError(f"{f.name}: file ended inside a tensor (truncated?)")
    if not direct:
        dest.copy_(target)


def _drop_page_cache(f) -> None:
    """Tell the kernel a fully read weight file's pages are not needed again (the model holds its own copy)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def load_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MolmoeForCausalLM:
    config = MolmoeConfig.from_folder(folder)
    model = build_model(config, device, dtype)
    load_weights(model, folder)
    return model.eval().requires_grad_(False)


def save_weights(model: MolmoeForCausalLM, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write the model's weights under their original names as safetensors (sharded when large)."""
    tensors = ((name, t) for name, t in model.weight_slots().items())
    write_safetensors(tensors, Path(folder), dtype)


def write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, dtype: torch.dtype | None, shard_bytes: int = SHARD_BYTES
) -> None:
    """Stream (name, tensor) pairs into `model.safetensors`, or numbered shards plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, tensor in tensors:
        t = tensor.detach().to("cpu", dtype or tensor.dtype).clone().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFETENSORS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def convert(
    src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES
) -> None:
    """One-time conversion of a checkpoint folder or hub id (e.g. the fp32 `pytorch_model.bin`) to sharded
    safetensors.

    Validates names and shapes against the folder's config first, then streams tensor by tensor, so peak
    memory stays near one shard.
    """
    src, dst = resolve_checkpoint(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("convert: destination must differ from the source folder")
    config = MolmoeConfig.from_folder(src)
    with torch.device("meta"):
        expected = {n: t.shape for n, t in MolmoeForCausalLM(config).weight_slots().items()}
    _check_names(expected, {n: t.shape for n, t in iter_tensors(src)}, src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
    write_safetensors(iter_tensors(src), dst, dtype, shard_bytes)
    log.info("converted %s -> %s (%s)", src, dst, dtype)


def fingerprint(folder: str | Path) -> str:
    """The identity of a checkpoint: a digest of its config.json and of the whole content of its weight files.

    Controller artifacts, profiles and block rankings carry it and are refused for another model, so a
    checkpoint whose weights changed anywhere is another model. A weight file's digest is cached by its
    path, size and modification time (`fingerprint_cache_path()`), so a 14 GB checkpoint is read once.
    """
    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weight_files(folder):
        h.update(path.name.encode())
        h.update(_file_digest(path).encode())
    return h.hexdigest()[:16]


def fingerprint_cache_path() -> Path:
    """`$LMMS_ADAPTIVE_CACHE`, else `$XDG_CACHE_HOME/lmms_adaptive`, else `~/.cache/lmms_adaptive`, plus
    `file_digests.json`."""
    root = (
        os.environ.get("LMMS_ADAPTIVE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmms_adaptive"
    )
    return Path(root) / "file_digests.json"


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    cache_path = fingerprint_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # best effort: an unwritable cache only costs the next call a re-read
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fresh = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        fresh = fresh if isinstance(fresh, dict) else {}
        fresh[key] = {"stamp": stamp, "sha256": digest}
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, cache_path)
    except (OSError, json.JSONDecodeError):
        log.debug("could not update the digest cache %s", cache_path)
    return digest


def default_checkpoint() -> Path:
    """The built-in default model: the tiny MolmoE trained on the synthetic suite, shipped in the package."""
    if not (SHIPPED_CHECKPOINT / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the shipped default checkpoint is missing from {SHIPPED_CHECKPOINT}; reinstall the package, "
            "or train one with `python -m lmms_adaptive.default.pretrain` and pass it as pretrained=<folder>"
        )
    return SHIPPED_CHECKPOINT


def read_drop_order(folder: Path, model_id: str) -> tuple[int, ...] | None:
    """The measured block ranking (`python -m lmms_adaptive.tools.importance`) stored in the checkpoint
    folder, or None (the knob space's default order) when there is none or it was measured on another model."""
    path = folder / IMPORTANCE_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        order, made_for = tuple(int(i) for i in saved["drop_order"]), saved["model_fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: not a block importance file (needs drop_order and model_fingerprint): {err}"
        ) from err
    if made_for != model_id:
        log.warning("%s was measured on model %s, not %s: ignored (default block order used)", path, made_for, model_id)
        return None
    return order
