"""Block importance: rank the decoder blocks on calibration samples, for the plans that drop blocks.

    python -m lmms_adaptive.tools.importance --tasks synth_vqa_val --include-path tasks --limit 24

Each block is scored by 1 - cos(block input, block output) (mean over prompt tokens, full plan);
`--drop-score` adds the task-score drop when the block alone is removed. The ranking is written as
`block_importance.json` (with the model fingerprint) into the checkpoint folder, where the runtime reads it
to choose which blocks a plan drops.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lmms_adaptive.core.checkpoint import IMPORTANCE_FILE
from lmms_adaptive.core.model import LayerSchedule
from lmms_adaptive.core.runtime import AdaptiveMolmoe
from lmms_adaptive.integration.tasks import TaskSample
from lmms_adaptive.serving.request import generation_config, task_style
from lmms_adaptive.tools.cli import HelpFormatter, progress, setup_logging, took
from lmms_adaptive.tools.profile import add_sample_args, load_model_and_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockImportance:
    """Per-block importance of one model; `drop_order` lists blocks least important first."""

    model_fingerprint: str
    cosine: list[float]  # mean 1 - cos(input, output) of each block
    drop_score: list[float] | None  # mean task-score drop when only that block is removed
    drop_order: list[int]
    n_samples: int
    tasks: list[str]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> BlockImportance:
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: not a block importance file ({err})") from err


def ranking(cosine: Sequence[float], drop_score: Sequence[float] | None) -> list[int]:
    """Least important first: by score drop when measured (ties by cosine), else by cosine; ties by depth (deeper first)."""
    n = len(cosine)
    key = (lambda i: (drop_score[i], cosine[i], -i)) if drop_score is not None else (lambda i: (cosine[i], -i))
    return sorted(range(n), key=key)


@torch.inference_mode()
def block_cosine(rt: AdaptiveMolmoe, samples: Sequence[TaskSample], style: str = "auto") -> list[float]:
    """Mean over samples of each block's mean 1 - cos(input, output) over the prompt tokens, full plan."""
    knobs, model = rt.knobs, rt.model
    schedule = rt.schedule(knobs.full_plan())
    totals = np.zeros(knobs.n_layers)

    for sample in progress(samples, desc="importance (cosine)", unit="sample"):
        request = rt.processor(
            sample.context, sample.images, max_crops=knobs.max_crops, style=task_style(sample.task, style)
        )
        ids = torch.as_tensor(request.input_ids, device=rt.device)[None]
        features, idx = rt.vision(request)
        x = model.embed(ids, features, idx)
        rope = model.rope(torch.arange(ids.shape[1], device=rt.device)[None])
        for block, top_k in schedule.layers:
            out = model.run_blocks(x, rope, [(block, top_k)], schedule.renormalize)
            totals[block] += float((1 - torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1)).mean())
            x = out
    return list(totals / max(1, len(samples)))


def block_drop_scores(
    rt: AdaptiveMolmoe, samples: Sequence[TaskSample], max_new_tokens: int, style: str = "auto"
) -> list[float]:
    """Mean task-score drop when each block alone is removed (full plan otherwise)."""
    knobs = rt.knobs
    full = rt.schedule(knobs.full_plan())

    def mean_score(schedule: LayerSchedule) -> float:
        scores = []
        for sample in samples:
            gen = generation_config(sample.gen_kwargs, max_new_tokens)
            request = rt.processor(
                sample.context, sample.images, max_crops=knobs.max_crops, style=task_style(sample.task, style)
            )
            scores.append(sample.score(rt.run(request, knobs.full_plan(), gen, schedule=schedule).text))
        return float(np.mean(scores))

    base = mean_score(full)
    drops = []
    for block in progress(range(knobs.n_layers), desc="importance (drop one block)", unit="block"):
        without = LayerSchedule(tuple(layer for layer in full.layers if layer[0] != block), full.renormalize)
        drops.append(base - mean_score(without))
    return drops


def importance(
    rt: AdaptiveMolmoe, samples: Sequence[TaskSample], with_drop_score: bool, max_new_tokens: int
) -> BlockImportance:
    cosine = block_cosine(rt, samples)
    drops = block_drop_scores(rt, samples, max_new_tokens) if with_drop_score else None
    return BlockImportance(
        model_fingerprint=rt.model_id,
        cosine=[round(c, 6) for c in cosine],
        drop_score=None if drops is None else [round(d, 6) for d in drops],
        drop_order=ranking(cosine, drops),
        n_samples=len(samples),
        tasks=sorted({s.task for s in samples}),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmms_adaptive.tools.importance",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_sample_args(parser)
    parser.add_argument(
        "--drop-score", action="store_true", help="also measure the task-score drop of removing each block (slower)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default: <checkpoint>/{IMPORTANCE_FILE})")
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    setup_logging()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    rt, samples = load_model_and_samples(args)
    result = importance(rt, samples, args.drop_score, args.max_new_tokens)
    out = args.out or rt.folder / IMPORTANCE_FILE
    result.save(out)
    log.info("importance: %d blocks ranked on %d samples -> %s; took %s", len(result.drop_order), len(samples), out,
             took(started))  # fmt: skip
    print(f"drop order (least important first): {result.drop_order}\nwritten to {out}")


if __name__ == "__main__":
    main()
