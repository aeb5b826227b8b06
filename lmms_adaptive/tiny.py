"""Build a tiny MolmoE checkpoint folder in the real format: config schema, parameter names, tokenizer files.

    python -m lmms_adaptive.tiny OUT_DIR [--seed 0]

Deterministic for a seed (same bytes every time), built in seconds on a CPU. It is the default model
when the user names none (`default_checkpoint()`), so every command works offline out of the box.
Its weights are random: it exercises the whole system, it does not answer questions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import build_model, save_weights
from .config import MolmoeConfig

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-molmoe-v1"
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
EOS, PAD = "<|endoftext|>", "<|padding|>"

# Small dimensions in the real schema; the knob space keeps MolmoE's shape (top-k 4..8, 3 tiers).
TINY_DIMS = {
    "d_model": 128, "n_heads": 4, "n_layers": 8, "mlp_ratio": 1, "moe_num_experts": 16, "moe_top_k": 8,
    "vision_backbone": {"image_emb_dim": 64, "image_head_dim": 16, "image_num_heads": 4,
                        "image_num_key_value_heads": 4, "image_mlp_dim": 128, "image_num_layers": 9},
}  # fmt: skip

_CORPUS_SEEDS = (
    "What is in the image? What color is the square? How many circles are there? What is written on the sign?",
    "Is there a red triangle in the image? Answer the question using a single word or phrase. Yes No",
    "User: Assistant: text_vqa: vqa2: The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "red green blue yellow orange purple black white gray circle square triangle star left right top bottom",
    "one two three four five six seven eight nine ten stop open closed exit sale cafe hotel taxi bus",
)


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE (any text encodes) with the real special tokens: EOS/BOS, padding, image tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line.lower() if i % 2 else line for i in range(8) for line in _CORPUS_SEEDS]
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(list(IMAGE_TOKENS))
    return tok


def tiny_config(vocab_size: int) -> dict:
    """The real MolmoE-1B config.json with small dimensions (every key of the real schema present)."""
    real = json.loads((Path(__file__).parent / "resources" / "molmoe_config.json").read_text())
    config = {**real, **{k: v for k, v in TINY_DIMS.items() if k != "vision_backbone"}}
    config["vision_backbone"] = {**real["vision_backbone"], **TINY_DIMS["vision_backbone"]}
    config["vocab_size"] = vocab_size
    config["embedding_size"] = -(-(vocab_size + len(IMAGE_TOKENS)) // 128) * 128
    return config


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.weight_slots().items()):
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1 and "embedding" not in name:  # norm scales
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_tiny(out: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write a complete tiny checkpoint folder to `out` and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    base_vocab = tokenizer.get_vocab_size() - len(IMAGE_TOKENS)
    config = tiny_config(base_vocab)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS)
    pad_id = tokenizer.token_to_id(PAD)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "pad_token_id": pad_id}, indent=2) + "\n")
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD, "additional_special_tokens": list(IMAGE_TOKENS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 4096}, indent=2) + "\n")
    shutil.copyfile(Path(__file__).parent / "resources" / "preprocessor_config.json", out / "preprocessor_config.json")
    model = build_model(MolmoeConfig.from_dict(config), "cpu", torch.float32)
    _init_weights(model, seed)
    save_weights(model, out)
    log.info("built tiny MolmoE checkpoint in %s", out)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("LMMS_ADAPTIVE_HOME", Path.home() / ".cache" / "lmms_adaptive"))


def default_checkpoint() -> Path:
    """The built-in default model folder, built once into the cache (atomically, safe across processes)."""
    target = cache_root() / TINY_VERSION
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        build_tiny(Path(tmp) / "ckpt")
        try:
            os.rename(Path(tmp) / "ckpt", target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_tiny(args.out, args.seed))


if __name__ == "__main__":
    main()
