"""One-time conversion of a MolmoE checkpoint folder to (sharded) safetensors, bf16 by default.

    python -m lmms_adaptive.tools.convert /ckpt/MolmoE-1B-0924 /ckpt/MolmoE-1B-0924-bf16

The official release is one 28.9 GB fp32 pickle; the converted folder (~14.4 GB) loads faster,
memory-mapped, and never touches pickle. Names and shapes are validated before anything is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lmms_adaptive.core.checkpoint import convert
from lmms_adaptive.core.runtime import resolve_dtype


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="checkpoint folder or hub id (pytorch_model.bin or safetensors)")
    parser.add_argument("dst", type=Path, help="output folder (created)")
    parser.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    convert(args.src, args.dst, resolve_dtype(args.dtype, torch.device("cpu")))


if __name__ == "__main__":
    main()
