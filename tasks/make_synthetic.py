"""Write the parquet files of the ``synth_*`` lmms-eval tasks from :mod:`lmms_adaptive.default.synthetic`.

    python tasks/make_synthetic.py            # rewrite tasks/synth_*.parquet
    python tasks/make_synthetic.py OUT_DIR    # write them somewhere else (used by the tests)

Deterministic: the samples are a pure function of (split, SEED, question type, index), and the
PNG / parquet encoders are deterministic, so with the same Pillow / datasets / pyarrow versions
the files are byte-identical.
"""

from __future__ import annotations

import os
import sys

from lmms_adaptive.default.synthetic import VQA_QTYPES, generate, write_parquet

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0

# file stem -> (split, layout, question types, number of rows, first question id)
FILES = {
    "synth_vqa_val": ("validation", "textvqa", VQA_QTYPES, 60, 10_000),
    "synth_vqa_test": ("test", "textvqa", VQA_QTYPES, 120, 20_000),
    "synth_pope_val": ("validation", "pope", ("yesno",), 20, 30_000),
    "synth_pope_test": ("test", "pope", ("yesno",), 40, 40_000),
}


def main(out_dir: str = HERE) -> None:
    for stem, (split, layout, qtypes, n, first_id) in FILES.items():
        path = os.path.join(out_dir, f"{stem}.parquet")
        size = write_parquet(generate(split, n, SEED, qtypes), path, layout, first_id)
        print(f"wrote {path}: {n} rows, {size} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE)
