"""One decode token through its k chosen experts, in the two ways the expert weights can be stacked.

    OMP_NUM_THREADS=1 python benchmarks/expert_layout.py --json /tmp/expert_layout.json

The experts of one block are stored output-major (`gate_up [E, 2H, D]`, `down [E, D, H]`, like the
checkpoint's per-expert [out, in] matrices; what `core.model.Experts` holds) or could be input-major
(`[E, D, 2H]`, `[E, H, D]`). For each shape (`mid` fp32 and the real MolmoE-1B block in bf16) this times,
interleaved, the product of one token with k random experts: under torch.compile as reductions over the
indexed weights (what the compiled decode step runs, `core.model.experts_indexed`) and eagerly as a loop of
one-row products (the uncompiled decode). It prints the median time and the bandwidth it reaches (the
experts' bytes over the time); the weights are larger than the caches and the experts drawn afresh each time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = {  # name -> (d_model, expert hidden, dtype); 64 experts, top-k 8 as in MolmoE-1B
    "mid": (128, 256, torch.float32),
    "full": (2048, 1024, torch.bfloat16),
}
N_EXPERTS, TOP_K = 64, 8


@dataclass
class Row:
    shape: str
    layout: str  # output-major | input-major
    path: str  # compiled | eager
    median_us: float
    gbps: float


def compiled_output_major(x: Tensor, w: Tensor, chosen: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    gate, up = (gate_up[chosen] * x[0]).sum(-1).chunk(2, dim=-1)
    return w @ (down[chosen] * (F.silu(gate) * up)[:, None, :]).sum(-1)


def compiled_input_major(x: Tensor, w: Tensor, chosen: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    gate, up = (x[0, :, None] * gate_up[chosen]).sum(1).chunk(2, dim=-1)
    return w @ ((F.silu(gate) * up)[:, :, None] * down[chosen]).sum(1)


def eager_loop(output_major: bool) -> Callable[..., Tensor]:
    def run(x: Tensor, w: Tensor, chosen: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for weight, e in zip(w, chosen.tolist(), strict=True):
            if output_major:
                gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
                out += weight * F.linear(F.silu(gate) * up, down[e])
            else:
                gate, up = (x @ gate_up[e]).chunk(2, dim=-1)
                out += weight * ((F.silu(gate) * up) @ down[e])
        return out

    return run


def measure(shape: str, repeats: int) -> list[Row]:
    d, h, dtype = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(N_EXPERTS, 2 * h, d, generator=gen).to(dtype) / d**0.5
    down = torch.randn(N_EXPERTS, d, h, generator=gen).to(dtype) / h**0.5
    weights = {
        "output-major": (gate_up, down),
        "input-major": (gate_up.transpose(1, 2).contiguous(), down.mT.contiguous()),
    }
    runs = {
        ("output-major", "compiled"): torch.compile(compiled_output_major, fullgraph=True),
        ("input-major", "compiled"): torch.compile(compiled_input_major, fullgraph=True),
        ("output-major", "eager"): eager_loop(True),
        ("input-major", "eager"): eager_loop(False),
    }
    x = torch.randn(1, d, generator=gen).to(dtype)
    w = torch.rand(TOP_K, generator=gen).to(dtype)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        chosen = torch.randperm(N_EXPERTS, generator=gen)[:TOP_K]
        expected = runs["output-major", "eager"](x, w, chosen, *weights["output-major"])
        for (layout, _), fn in runs.items():  # compile, and check every way gives the same product
            got = fn(x, w, chosen, *weights[layout]).reshape(expected.shape)
            torch.testing.assert_close(got.float(), expected.float(), rtol=5e-2, atol=5e-2)
        for _ in range(repeats):
            for (layout, path), fn in runs.items():
                chosen = torch.randperm(N_EXPERTS, generator=gen)[:TOP_K]
                start = time.perf_counter()
                fn(x, w, chosen, *weights[layout])
                times[layout, path].append(time.perf_counter() - start)
    mbytes = TOP_K * 3 * d * h * dtype.itemsize / 1e6
    rows = []
    for (layout, path), seconds in times.items():
        median = statistics.median(seconds)
        rows.append(Row(shape, layout, path, round(median * 1e6, 1), round(mbytes / median / 1e3, 2)))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python benchmarks/expert_layout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="mid,full", help="comma-separated shapes of SHAPES (default: mid,full)")
    p.add_argument("--repeats", type=int, default=50, help="timed products per way (default 50)")
    p.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected a subset of {sorted(SHAPES)}")
    rows = [row for shape in shapes for row in measure(shape, args.repeats)]
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {N_EXPERTS} experts, top-k {TOP_K}")
    print(f"{'shape':6} {'layout':13} {'path':9} {'median us':>10} {'GB/s':>7}")
    for r in rows:
        print(f"{r.shape:6} {r.layout:13} {r.path:9} {r.median_us:10.1f} {r.gbps:7.2f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
