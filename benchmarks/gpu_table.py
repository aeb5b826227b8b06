"""The table of `gpu_check.sh`: its steps' JSON files in one folder -> a Markdown table and gpu_check.json.

    python benchmarks/gpu_table.py RESULTS_DIR

Reads what exists of `knobs.json`, `graphs.json` (knob_latency.py), `controller.json`
(controller_overhead.py) and `peers.json` (peers.py); a missing file leaves its rows out. Each row is a
metric with its value, a comparison (a ratio or the floor) and the issue's target where it has one.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Line:
    metric: str
    value: float
    unit: str
    compared: str = ""  # e.g. "0.62x k=8" or "3.1x floor"
    target: str = ""


def read(folder: Path, name: str) -> list[dict]:
    path = folder / name
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: expected a JSON list of rows")
    return rows


def knob_lines(rows: list[dict], impl: str, label: str) -> list[Line]:
    """Decode per (k, blocks) at the highest tier, ratios k=4/k=8 and fewer/all blocks, and time to first token."""
    rows = [r for r in rows if r["impl"] == impl]
    if not rows:
        return []
    tier, n_layers, top = (
        max(r["max_crops"] for r in rows),
        max(r["active_blocks"] for r in rows),
        max(r["top_k"] for r in rows),
    )
    at = {(r["top_k"], r["active_blocks"]): r for r in rows if r["max_crops"] == tier}
    lines = []
    for (k, blocks), r in sorted(at.items(), key=lambda kv: (-kv[0][1], -kv[0][0])):
        compared = []
        if k != top and (top, blocks) in at:
            compared.append(f"{r['decode_ms_per_token'] / at[top, blocks]['decode_ms_per_token']:.2f}x k={top}")
        if blocks != n_layers and (k, n_layers) in at:
            compared.append(
                f"{r['decode_ms_per_token'] / at[k, n_layers]['decode_ms_per_token']:.2f}x {n_layers} blocks"
            )
        if r.get("x_floor"):
            compared.append(f"{r['x_floor']:.1f}x floor")
        lines.append(
            Line(
                f"decode {label}, k={k}, {blocks} blocks",
                r["decode_ms_per_token"],
                "ms/token",
                ", ".join(compared),
                decode_target(k, blocks, top, n_layers),
            )
        )
    full = at.get((top, n_layers))
    if full is not None:
        ttft = full["total_ms"] - (full["new_tokens"] - 1) * full["decode_ms_per_token"]
        detail = (
            f"vision {full['vision_ms']:.1f} + prefill {full['prefill_ms']:.1f} ms, {full['n_prompt_tokens']} tokens"
        )
        lines.append(
            Line(
                f"time to first token {label}, {full['n_crops']} crops ({full['image']})",
                ttft,
                "ms",
                detail,
                "<= 40 ms",
            )
        )
    return lines


def decode_target(k: int, blocks: int, top: int, n_layers: int) -> str:
    """The issue's GPU targets for a decode row."""
    if blocks != n_layers:
        return f"<= 0.8x {n_layers} blocks"
    return "<= 2 ms" if k == top else f"<= 0.7x k={top}"


def controller_lines(rows: list[dict]) -> list[Line]:
    return [
        Line(f"controller, {r['image']}", r["controller_ms"], "ms",
             f"{r['overhead_pct']:.1f} % of the request (extra {r['extra_ms']:.2f} ms)", "<= 0.5 ms and <= 2 %")
        for r in rows
    ]  # fmt: skip


def peer_lines(rows: list[dict]) -> list[Line]:
    lines = []
    for r in sorted(rows, key=lambda r: (-r["top_k"], r["impl"] != "ours", r["impl"])):
        mine = r["impl"] == "ours"
        lines.append(Line(f"decode {r['impl']}, k={r['top_k']} (peers run)", r["decode_ms_per_token"], "ms/token",
                          "" if mine else f"{r['x_decode']:.2f}x ours"))  # fmt: skip
        lines.append(Line(f"prefill {r['impl']}, k={r['top_k']}, {r['n_prompt_tokens']} tokens", r["prefill_ms"], "ms",
                          "" if mine else f"{r['x_prefill']:.2f}x ours",
                          ">= 1.0x ours" if r["impl"] == "olmoe" else ""))  # fmt: skip
    return lines


def table(folder: Path) -> list[Line]:
    return (
        knob_lines(read(folder, "knobs.json"), "fast", "eager")
        + knob_lines(read(folder, "graphs.json"), "compiled", "graphs")
        + controller_lines(read(folder, "controller.json"))
        + peer_lines(read(folder, "peers.json"))
    )


def markdown(lines: list[Line], device: str) -> str:
    out = [f"Device: {device}", "", "| metric | value | compared | target |", "|---|---|---|---|"]
    out += [f"| {x.metric} | {x.value:.2f} {x.unit} | {x.compared} | {x.target} |" for x in lines]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[Line]:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the folder gpu_check.sh wrote its steps' JSON files to")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder}: no such folder")
    lines = table(args.folder)
    if not lines:
        raise SystemExit(f"{args.folder}: none of knobs.json, graphs.json, controller.json, peers.json holds rows")
    device = next((r["device_name"] for name in ("knobs.json", "peers.json") for r in read(args.folder, name)), "?")
    text = markdown(lines, device)
    print(text, end="")
    (args.folder / "gpu_check.md").write_text(text)
    (args.folder / "gpu_check.json").write_text(
        json.dumps({"device": device, "rows": [asdict(x) for x in lines]}, indent=2) + "\n"
    )
    return lines


if __name__ == "__main__":
    main()
