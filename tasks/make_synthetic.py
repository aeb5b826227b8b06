"""Write the parquet files of the ``synth_*`` lmms-eval tasks from :mod:`lmms_adaptive.default.synthetic`.

    python tasks/make_synthetic.py            # rewrite tasks/synth_*.parquet
    python tasks/make_synthetic.py OUT_DIR    # write them somewhere else (used by the tests)

Deterministic: the samples are a pure function of (split, seed, question type, index), and the
PNG / parquet encoders are deterministic, so with the same Pillow / datasets / pyarrow versions
the files are byte-identical.

The ``*_train`` tasks are the controllers' training split: the generator's validation partition (the
model's pretraining never draws from it) at seed 1, so they share no sample with ``*_val`` (seed 0) and,
being another partition, none with ``*_test``.
"""

from __future__ import annotations

import os
import sys

from lmms_adaptive.default.synthetic import VQA_QTYPES, generate, write_parquet

HERE = os.path.dirname(os.path.abspath(__file__))

# file stem -> (split, seed, layout, question types, number of rows, first question id)
FILES = {
    "synth_vqa_val": ("validation", 0, "textvqa", VQA_QTYPES, 75, 10_000),
    "synth_vqa_test": ("test", 0, "textvqa", VQA_QTYPES, 150, 20_000),
    "synth_pope_val": ("validation", 0, "pope", ("yesno",), 20, 30_000),
    "synth_pope_test": ("test", 0, "pope", ("yesno",), 40, 40_000),
    "synth_vqa_train": ("validation", 1, "textvqa", VQA_QTYPES, 2500, 100_000),
    "synth_pope_train": ("validation", 1, "pope", ("yesno",), 400, 200_000),
}


def main(out_dir: str = HERE, stems: tuple[str, ...] = tuple(FILES)) -> None:
    for stem in stems:
        split, seed, layout, qtypes, n, first_id = FILES[stem]
        path = os.path.join(out_dir, f"{stem}.parquet")
        size = write_parquet(generate(split, n, seed, qtypes), path, layout, first_id)
        print(f"wrote {path}: {n} rows, {size} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE)
