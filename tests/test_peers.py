"""benchmarks/peers.py (ours beside transformers' OLMoE), benchmarks/gpu_table.py and benchmarks/gpu_check.sh
(its CPU dry run and its refusal without a GPU), on the tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import peers  # noqa: E402 (the benchmark scripts are found through sys.path)


def test_peers_rows_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    rows = peers.main(["--size", "tiny", "--device", "cpu", "--top-k", "8,4", "--repeats", "1", "--new-tokens", "3",
                       "--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert {(r["impl"], r["top_k"]) for r in saved} == {("ours", 8), ("ours", 4), ("olmoe", 8), ("olmoe", 4)}
    for r in rows:
        assert r.prefill_ms > 0 and r.decode_ms_per_token > 0 and r.n_prompt_tokens > 100
        ours = next(o for o in rows if o.impl == "ours" and o.top_k == r.top_k)
        assert r.x_decode == pytest.approx(r.decode_ms_per_token / ours.decode_ms_per_token)
        assert r.x_prefill == pytest.approx(r.prefill_ms / ours.prefill_ms)


def test_olmoe_peer_has_our_decoder_shapes_and_routes_top_k() -> None:
    from knob_latency import build_runtime

    rt = build_runtime("tiny", torch.device("cpu"), torch.float32, seed=0)
    c = rt.model.config
    peer = peers.olmoe_model(c, torch.device("cpu"), torch.float32, seed=0)
    blocks = sum(p.numel() for n, p in rt.model.named_parameters() if ".blocks." in n)
    assert sum(p.numel() for n, p in peer.named_parameters() if ".layers." in n) == blocks  # attention, norms, MoE
    peers.set_top_k(peer, 3)
    assert peer.config.num_experts_per_tok == 3 and all(m.top_k == 3 for m in peer.modules() if hasattr(m, "top_k"))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_table(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = json.loads((tmp_path / "gpu_check.json").read_text())
    metrics = [r["metric"] for r in table["rows"]]
    assert any(m.startswith("decode eager, k=8, 8 blocks") for m in metrics)
    assert any(m.startswith("time to first token eager") for m in metrics)
    assert any(m.startswith("controller") for m in metrics) and any("olmoe" in m for m in metrics)
    assert "| metric | value | compared | target |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_without_a_gpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and not list(tmp_path.glob("*.json"))


STAND_IN_CONFIG = """
from transformers import PretrainedConfig


class MolmoConfig(PretrainedConfig):
    model_type = "molmo"
"""

STAND_IN_MODEL = """
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config_molmoe import MolmoConfig

CALLS = []


class Router(torch.nn.Module):
    top_k = 8


class MolmoForCausalLM(PreTrainedModel):
    config_class = MolmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.router = Router()
        self.head = torch.nn.Linear(2, 2)
        self.post_init()

    def forward(self, input_ids, images=None, image_masks=None, image_input_idx=None, past_key_values=None,
                use_cache=False):
        CALLS.append((input_ids.shape[1], None if images is None else images.shape[1], past_key_values, self.router.top_k))
        seen = (past_key_values or 0) + input_ids.shape[1]
        return CausalLMOutputWithPast(logits=torch.zeros(1, input_ids.shape[1], 7), past_key_values=seen)
"""


def test_original_peer_drives_the_remote_code_forward(tmp_path: Path) -> None:
    """The original's path on a stand-in with the original's forward signature: loaded from our saved checkpoint
    through trust_remote_code, prefilled with our processor's image inputs, then one token per step on its cache."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "config_molmoe.py").write_text(STAND_IN_CONFIG)
    (code / "modeling_molmoe.py").write_text(STAND_IN_MODEL)
    rows = peers.main(["--size", "tiny", "--device", "cpu", "--top-k", "8,4", "--repeats", "1", "--new-tokens", "3",
                       "--no-olmoe", "--original", str(code)])  # fmt: skip
    assert {(r.impl, r.top_k) for r in rows} == {("ours", 8), ("ours", 4), ("original", 8), ("original", 4)}
    calls = next(m for name, m in sys.modules.items() if name.endswith("modeling_molmoe")).CALLS
    n_prompt = rows[0].n_prompt_tokens
    prefills = [c for c in calls if c[2] is None]
    assert len(prefills) == 4 and all(c[0] == n_prompt and c[1] > 1 for c in prefills)  # warm-up + timed, k=8 and 4
    assert [c[3] for c in prefills] == [8, 4, 8, 4]
    assert [c[2] for c in calls if c[2] is not None] == [n_prompt, n_prompt + 1] * 4  # one token a step, cache kept
