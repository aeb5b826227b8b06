"""benchmarks/full_size.py end to end at the tiny size: a sharded random checkpoint written, loaded through the
plugin in a fresh process, one lmms-eval request answered, memory and decode measured, the folder removed;
and the loader's memory path (weights read into the model's own storage)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import full_size  # noqa: E402 (the benchmark scripts are found through sys.path)

from lmms_adaptive.core.checkpoint import SAFETENSORS_INDEX, CheckpointError, load_model, stored_tensors  # noqa: E402


@pytest.mark.slow
def test_full_size_tiny_end_to_end(tmp_path: Path, lmms_env) -> None:
    out = tmp_path / "result.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = ["--size", "tiny", "--shard-mb", "1", "--new-tokens", "3", "--floor-repeats", "1",
            "--tmp-dir", str(scratch), "--json", str(out)]  # fmt: skip
    result = full_size.main(argv)
    saved = json.loads(out.read_text())
    assert saved == {k: getattr(result, k) for k in saved}
    assert result.n_shards > 1 and result.cleaned and not any(scratch.iterdir())
    assert result.peak_rss_bytes >= result.load_peak_rss_bytes > result.baseline_rss_bytes > 0
    assert result.x_weights == pytest.approx(result.load_peak_rss_bytes / result.weight_bytes)
    assert result.load_s > 0 and result.request_total_ms > 0 and isinstance(result.answer, str)
    assert result.decode_ms_per_token > 0 and result.floor_ms > 0 and result.decode_weight_bytes > 0
    assert result.x_floor == pytest.approx(result.decode_ms_per_token / result.floor_ms)


def test_written_checkpoint_is_the_real_layout_and_loads(tmp_path: Path) -> None:
    config = full_size.write_side_files(tmp_path, "tiny", None)
    layout = full_size.checkpoint_layout(config)
    total, shards = full_size.write_random_checkpoint(tmp_path, layout, "bf16", 200_000, seed=0)
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert shards == len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(layout)
    assert index["metadata"]["total_size"] == total
    stored = {n: t for f in set(index["weight_map"].values()) for n, t in stored_tensors(tmp_path / f).items()}
    assert {n: t.shape for n, t in stored.items()} == layout and {t.dtype for t in stored.values()} == {torch.bfloat16}
    model = load_model(tmp_path, "cpu", torch.bfloat16)  # read straight into the model's storage
    slots = model.weight_slots()
    assert all(slots[n].dtype == torch.bfloat16 for n in layout)
    assert torch.count_nonzero(slots["lm_head.weight"]) > 0 and torch.all(slots["model.transformer.ln_f.weight"] == 1)
    upcast = load_model(tmp_path, "cpu", torch.float32)  # through a one-tensor temporary, cast
    assert torch.equal(upcast.weight_slots()["lm_head.weight"], slots["lm_head.weight"].float())


def test_a_header_pointing_past_the_end_is_named(tmp_path: Path) -> None:
    config = full_size.write_side_files(tmp_path, "tiny", None)
    full_size.write_random_checkpoint(tmp_path, full_size.checkpoint_layout(config), "bf16", 1 << 30, seed=0)
    (shard,) = tmp_path.glob("*.safetensors")
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(CheckpointError, match=str(shard)):
        load_model(tmp_path, "cpu", torch.bfloat16)
