"""One-time conversion of a MolmoE checkpoint folder to (sharded) safetensors, bf16 by default.

    python -m lmms_adaptive.tools.convert /ckpt/MolmoE-1B-0924 /ckpt/MolmoE-1B-0924-bf16

The official release is one 28.9 GB fp32 pickle; the converted folder (~14.4 GB) loads faster,
memory-mapped, and never touches pickle. Names and shapes are validated before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lmms_adaptive.core.checkpoint import convert
from lmms_adaptive.core.runtime import resolve_dtype
from lmms_adaptive.tools.cli import HelpFormatter, setup_logging, took

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("src", type=Path, help="checkpoint folder or hub id (pytorch_model.bin or safetensors)")
    parser.add_argument("dst", type=Path, help="output folder (created)")
    parser.add_argument("--dtype", default="bf16", help="weight dtype to write: bf16, fp16 or fp32")
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    setup_logging()
    import torch

    convert(args.src, args.dst, resolve_dtype(args.dtype, torch.device("cpu")))
    written = [f for f in args.dst.iterdir() if f.is_file()]
    size_gb = sum(f.stat().st_size for f in written) / 1e9
    log.info("convert: %d files (%.2f GB) in %s; took %s", len(written), size_gb, args.dst, took(started))


if __name__ == "__main__":
    main()
