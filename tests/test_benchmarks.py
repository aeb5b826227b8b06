"""The benchmark scripts run end to end on the tiny shapes and write the rows their READMEs describe
(their numbers are measurements, so only structure and internal consistency are checked here)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import budget_under_load  # noqa: E402
import controller_overhead  # noqa: E402 (the benchmark scripts are found through sys.path)
import decode_speed  # noqa: E402
import expert_layout  # noqa: E402
import knob_latency  # noqa: E402
import reading_diagnosis  # noqa: E402

ROW_KEYS = {
    "max_crops", "top_k", "active_blocks", "vision_ms", "prefill_ms", "decode_ms_per_token", "total_ms", "image",
    "n_prompt_tokens", "n_crops", "impl", "ratio_decode", "ratio_total", "device", "device_name", "dtype", "size",
    "torch_version", "new_tokens", "repeats", "decode_weight_bytes", "floor_ms", "x_floor",
}  # fmt: skip


def test_knob_latency_rows(tmp_path: Path) -> None:
    out = tmp_path / "knobs.json"
    argv = ["--size", "tiny", "--device", "cpu", "--tiers", "12", "--top-k", "4,8", "--blocks", "8", "--repeats", "1",
            "--warmup", "0", "--new-tokens", "3", "--reference", "--json", str(out)]  # fmt: skip
    rows = knob_latency.main(argv)
    saved = json.loads(out.read_text())
    assert len(saved) == len(rows) == 3 and all(set(r) == ROW_KEYS for r in saved)
    assert {(r["impl"], r["top_k"]) for r in saved} == {("fast", 4), ("fast", 8), ("reference", 8)}
    full = next(r for r in saved if r["impl"] == "fast" and r["top_k"] == 8)
    assert full["ratio_total"] == pytest.approx(1.0) and full["ratio_decode"] == pytest.approx(1.0)
    assert all(r["total_ms"] > r["vision_ms"] + r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in saved)


def test_controller_overhead_rows(tmp_path: Path) -> None:
    out = tmp_path / "controller.json"
    rows = controller_overhead.main(["--size", "tiny", "--device", "cpu", "--requests", "2", "--new-tokens", "2",
                                     "--json", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())
    assert row == {k: getattr(rows[0], k) for k in row}
    assert row["controller_ms"] == pytest.approx(row["stage1_ms"] + row["stage2_ms"])  # 2 requests: medians are means
    assert row["stage1_ms"] > 0 and row["stage2_ms"] > 0 and row["total_ms"] > 0 and row["static_total_ms"] > 0
    assert row["overhead_pct"] == pytest.approx(100.0 * row["extra_ms"] / row["total_ms"])


def test_reading_diagnosis_rows(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "reading.json"
    argv = ["--checkpoint", str(tiny_dir), "--tiers", "12", "--samples", "2", "--train-samples", "3",
            "--json", str(out)]  # fmt: skip
    (row,) = reading_diagnosis.main(argv)
    assert json.loads(out.read_text()) == [asdict(row)]
    assert row.max_crops == 12 and row.tokens_per_glyph >= 1  # at 12 crops a glyph spans about a token or more
    assert 0 < row.uniform < 1 and 0 <= row.attention <= 1 and 0 <= row.attention_block < 8
    assert all(0 <= getattr(row, k) <= 1 for k in ("exact", "digits", "token_probe", "glyph_probe"))


def test_budget_under_load_rows(tmp_path: Path, lmms_env) -> None:
    out = tmp_path / "load.json"
    rows = budget_under_load.main(["--limit", "1", "--load-processes", "1", "--budget", "120", "--json", str(out)])
    assert json.loads(out.read_text()) == [asdict(r) for r in rows]
    assert [(r.phase, r.guard) for r in rows] == [
        ("idle", False), ("idle", True), ("loaded (1 processes)", False), ("loaded (1 processes)", True)
    ]  # fmt: skip
    assert all(r.requests == 2 and 0 <= r.violation_rate <= 1 for r in rows)
    assert all((r.slowdown_mean is None) == (not r.guard) for r in rows)


@pytest.mark.compile
def test_decode_speed_report(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    report = decode_speed.main(["--size", "tiny", "--repeats", "1", "--new-tokens", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(asdict(report)))
    assert {(r["top_k"], r["blocks"]) for r in saved["decode"]} == {(8, 8), (8, 6), (4, 8), (4, 6)}
    assert all(r["floor_ms"] > 0 and r["eager_ms"] > 0 and r["compiled_ms"] > 0 for r in saved["decode"])
    assert saved["read_gbps"] > 0 and saved["warmup_s"] >= 0 and saved["prefill_ms"] > 0
    assert saved["olmoe_max_logit_diff"] < 1e-4  # transformers' OLMoE holds the same weights: the same logits


def test_expert_layout_rows(tmp_path: Path) -> None:
    """Every layout and path is timed (and checked against the others inside the script, before timing)."""
    out = tmp_path / "layout.json"
    rows = expert_layout.main(["--shapes", "mid", "--repeats", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == [asdict(r) for r in rows]
    assert {(r["layout"], r["path"]) for r in saved} == {
        (layout, path) for layout in ("output-major", "input-major") for path in ("compiled", "eager")
    }
    assert all(r["shape"] == "mid" and r["median_us"] > 0 and r["gbps"] > 0 for r in saved)
    with pytest.raises(SystemExit):
        expert_layout.main(["--shapes", "huge"])
