"""Build a tiny MolmoE checkpoint folder in the real format: config schema, parameter names, tokenizer files.

    python -m lmms_adaptive.default.tiny OUT_DIR [--seed 0]

Deterministic for a seed (same bytes every time), built in seconds on a CPU. Its weights are random:
it is the starting point of `python -m lmms_adaptive.default.pretrain` (which trains the shipped default,
`lmms_adaptive.core.checkpoint.default_checkpoint()`) and the quick fixture of tests that only need the format.

Tiny dimensions. The decoder keeps MolmoE's knob space in miniature (8 blocks, 16 experts, top-k 8,
tiers 3/6/12). The ViT uses 28 px patches instead of 14 px so a 336 px crop is 12x12 patches (6x6
pooled tokens): a quarter of the tokens, which is what makes training on a CPU fit in well under an
hour. The crop geometry in pixels is the real one (336 px crops, 224 px windows, 56 px margins), so a
tier means the same image resolution as on the real model.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmms_adaptive.core.checkpoint import build_model, save_weights
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.default import synthetic
from lmms_adaptive.tools.cli import HelpFormatter, setup_logging

log = logging.getLogger(__name__)

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
EOS, PAD = "<|endoftext|>", "<|padding|>"

# Small dimensions in the real schema; the knob space keeps MolmoE's shape (top-k 4..8, 3 tiers).
TINY_DIMS = {
    "d_model": 128, "n_heads": 4, "n_layers": 8, "mlp_ratio": 1, "moe_num_experts": 16, "moe_top_k": 8,
    "vit_layers": [-1, -3],
    "vision_backbone": {"image_emb_dim": 96, "image_head_dim": 16, "image_num_heads": 6,
                        "image_num_key_value_heads": 6, "image_mlp_dim": 192, "image_num_layers": 4,
                        "image_patch_size": 28, "image_pos_patch_size": 28, "image_num_pos": 145},
}  # fmt: skip
# The preprocessor for 28 px patches: same pixels per crop / window / margin as the real 336 / 224 / 56.
TINY_PREPROCESSOR = {
    "image_patch_size": 28,
    "image_token_length_h": 6,
    "image_token_length_w": 6,
    "overlap_margins": [2, 2],
}

# What the tokenizer is trained on: prompts and post-prompts of the supported tasks, the synthetic suite's
# whole vocabulary (so every answer word is one token) and some general text.
_CORPUS_SEEDS = (
    "What is in the image? What color is the square? How many circles are there? What is written on the sign?",
    "Is there a red triangle in the image? Answer the question using a single word or phrase. Yes No",
    "User: Assistant: text_vqa: vqa2: The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "red green blue yellow orange purple black white gray circle square triangle star left right top bottom",
    "one two three four five six seven eight nine ten stop open closed exit sale cafe hotel taxi bus",
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE (any text encodes; digits one token each) with the real special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = " ".join(synthetic.vocabulary())
    corpus = [line.lower() if i % 2 else line for i in range(8) for line in (*_CORPUS_SEEDS, words, words.lower())]
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(list(IMAGE_TOKENS))
    return tok


def tiny_config(vocab_size: int) -> dict:
    """The real MolmoE-1B config.json with small dimensions (every key of the real schema present)."""
    config = {**_resource("molmoe_config.json"), **{k: v for k, v in TINY_DIMS.items() if k != "vision_backbone"}}
    config["vision_backbone"] = {**config["vision_backbone"], **TINY_DIMS["vision_backbone"]}
    config["vocab_size"] = vocab_size
    config["embedding_size"] = -(-(vocab_size + len(IMAGE_TOKENS)) // 128) * 128
    return config


def tiny_preprocessor_config() -> dict:
    return {**_resource("preprocessor_config.json"), **TINY_PREPROCESSOR}


def _resource(name: str) -> dict:
    return json.loads((Path(__file__).resolve().parents[1] / "resources" / name).read_text())


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled init: every matrix N(0, 1/fan_in), token embeddings N(0, 1), ViT embeddings N(0, 0.3^2),
    zero biases, unit norm scales. Each layer then keeps its input's scale, so image features reach the
    decoder at the scale of the token embeddings. (A flat N(0, 0.02^2), right for 2048-wide layers, shrinks
    them ~1e-4x through the pooling and the SwiGLU projector at these widths, and a model trained from
    there learns to ignore the image.)"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.weight_slots().items()):
            if name.endswith("bias"):
                p.zero_()
            elif "wte" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith(("class_embedding", "positional_embedding", "pad_embed")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def write_folder(out: str | Path, config: dict, tokenizer: Tokenizer, preprocessor: dict) -> Path:
    """Everything of a checkpoint folder except the weights: config, tokenizer and processor files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {"eos_token_id": tokenizer.token_to_id(EOS), "pad_token_id": tokenizer.token_to_id(PAD)}
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    special = {
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(IMAGE_TOKENS),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 4096}, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


def build_tiny(out: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write a complete tiny checkpoint folder with random weights to `out` and return it."""
    tokenizer = train_tokenizer(vocab_size)
    config = tiny_config(tokenizer.get_vocab_size() - len(IMAGE_TOKENS))
    out = write_folder(out, config, tokenizer, tiny_preprocessor_config())
    model = build_model(MolmoeConfig.from_dict(config), "cpu", torch.float32)
    _init_weights(model, seed)
    save_weights(model, out)
    log.info("built tiny MolmoE checkpoint in %s", out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.default.tiny", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    print(build_tiny(args.out, args.seed))


if __name__ == "__main__":
    main()
