"""Find and check lmms-eval results files (its CLI exits 0 even when the evaluation failed).

    python -m lmms_adaptive.results OUTPUT_PATH --tasks textvqa_val_local,mme_local,pope_local
exits non-zero unless a results JSON under OUTPUT_PATH holds metrics for every task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def latest_results(output_path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest `*_results.json` below `output_path` (lmms-eval may add a model-name subfolder)."""
    files = sorted(Path(output_path).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {output_path}: the evaluation failed (see its log)")
    return files[-1], json.loads(files[-1].read_text())


def task_metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    """Numeric metrics of one task (`"metric,filter"` keys, stderr entries left out)."""
    entry = results.get("results", {}).get(task, {})
    return {k: v for k, v in entry.items() if "," in k and "stderr" not in k and isinstance(v, int | float)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_path", type=Path, help="the --output_path given to lmms-eval")
    parser.add_argument("--tasks", required=True, help="comma-separated task names that must have metrics")
    args = parser.parse_args(argv)
    try:
        path, results = latest_results(args.output_path)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    missing = [t for t in args.tasks.split(",") if not task_metrics(results, t)]
    for task in args.tasks.split(","):
        print(f"{task}: {task_metrics(results, task)}")
    if missing:
        print(f"{path}: no metrics for {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
