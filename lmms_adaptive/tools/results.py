"""Find and check lmms-eval results files (its CLI exits 0 even when the evaluation failed).

    python -m lmms_adaptive.tools.results OUTPUT_PATH --tasks textvqa_val_local,mme_local,pope_local
    python -m lmms_adaptive.tools.results OUTPUT_PATH --tasks synth_vqa_test --floor synth_vqa_test:exact_match=0.3
exits non-zero unless a results JSON under OUTPUT_PATH holds metrics for every task (and every floor holds).
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


def parse_floor(spec: str) -> tuple[str, str, float]:
    """ "TASK:METRIC=VALUE" -> (task, metric, value); METRIC is the results key before the comma."""
    target, sep, value = spec.rpartition("=")
    task, colon, metric = target.partition(":")
    try:
        if not (sep and colon and task and metric):
            raise ValueError
        return task, metric, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--floor must look like TASK:METRIC=VALUE, got {spec!r}") from None


def below_floor(results: dict[str, Any], task: str, metric: str, floor: float) -> str | None:
    """Why `task`'s `metric` fails its floor, or None when it holds."""
    values = [v for k, v in task_metrics(results, task).items() if k.split(",")[0] == metric]
    if not values:
        return f"{task} has no metric {metric!r} (has {sorted(task_metrics(results, task))})"
    return None if values[0] >= floor else f"{task} {metric} = {values[0]:.4f} < floor {floor}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_adaptive.tools.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_path", type=Path, help="the --output_path given to lmms-eval")
    parser.add_argument("--tasks", required=True, help="comma-separated task names that must have metrics")
    parser.add_argument("--floor", type=parse_floor, action="append", default=[], metavar="TASK:METRIC=VALUE",
                        help="a metric that must reach VALUE (repeatable), e.g. synth_vqa_test:exact_match=0.3")  # fmt: skip
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
    failed = [why for why in (below_floor(results, *floor) for floor in args.floor) if why]
    if failed:
        print(f"{path}: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
