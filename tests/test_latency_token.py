"""The latency token and the stage-2 decision inside the prefill (`plan.DeferredPlan`, `AdaptiveMolmoe.run`):
a probe that changes nothing the answer depends on, whose hidden state at block p is what stage 2 sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmms_adaptive.core.checkpoint import load_model
from lmms_adaptive.core.plan import DeferredPlan, Plan
from lmms_adaptive.core.processor import MolmoeProcessor
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig

QUESTION = "What is written on the sign?"
GEN = GenerationConfig(max_new_tokens=5, stop_at_eos=False, keep_step_logits=True)


@pytest.fixture(scope="module")
def rt(tiny_dir: Path) -> AdaptiveMolmoe:
    model = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    return AdaptiveMolmoe(model, MolmoeProcessor.from_pretrained(tiny_dir), drop_order=(5, 6, 3, 1, 2, 4, 7, 0))


def image(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (90, 120, 3), dtype=np.uint8)


def token(rt: AdaptiveMolmoe, seed: int = 0) -> torch.Tensor:
    return torch.randn(rt.model.config.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "plan",
    [
        Plan(max_crops=3, top_k=8, n_blocks=8, insert_pos=1),  # the full plan
        Plan(max_crops=3, top_k=4, n_blocks=6, insert_pos=1),
        Plan(max_crops=6, top_k=5, n_blocks=7, insert_pos=2),
        Plan(max_crops=3, top_k=6, n_blocks=8, insert_pos=3, renormalize=True),
    ],
)
def test_deferred_plan_outputs_match_the_plain_plan(rt: AdaptiveMolmoe, plan: Plan) -> None:
    """The latency token rides in the prompt's pass through blocks 0..p-1, one row more in the same matmuls:
    the same tokens, logits equal up to float rounding of the longer pass."""
    request = rt.processor(QUESTION, [image()], max_crops=plan.max_crops)
    seen = []

    def stage2(hidden: torch.Tensor) -> Plan:
        seen.append(hidden)
        return plan

    deferred = DeferredPlan(plan.max_crops, plan.insert_pos, token(rt), stage2, plan.renormalize)
    plain, probed = rt.run(request, plan, GEN), rt.run(request, deferred, GEN)
    assert probed.plan == plan and len(seen) == 1 and seen[0].shape == (rt.model.config.d_model,)
    assert probed.token_ids == plain.token_ids
    for a, b in zip(probed.step_logits, plain.step_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert probed.timings.stage2_ms > 0 and plain.timings.stage2_ms == 0


def test_probe_hidden_is_the_token_attending_to_the_whole_prompt(rt: AdaptiveMolmoe) -> None:
    """= the last position of a causal forward over prompt + token through blocks 0..p-1 (no cache)."""
    request = rt.processor(QUESTION, [image()], max_crops=3)
    model, t = rt.model, token(rt)
    for insert_pos in (1, 3):
        hidden = rt.latency_hidden(request, insert_pos, t)
        with torch.inference_mode():
            x = rt._embed_prompt(request)
            x = torch.cat([x, t.reshape(1, 1, -1)], dim=1)
            rope = model.rope(torch.arange(x.shape[1])[None])
            expected = model.run_blocks(x, rope, rt.knobs.head_layers(insert_pos), False)[0, -1]
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)


def test_probe_hidden_sees_the_image_the_budget_token_and_the_depth(rt: AdaptiveMolmoe) -> None:
    request = rt.processor(QUESTION, [image(0)], max_crops=3)
    other_image = rt.processor(QUESTION, [image(1)], max_crops=3)
    base = rt.latency_hidden(request, 2, token(rt, 0))
    assert not torch.allclose(base, rt.latency_hidden(other_image, 2, token(rt, 0)))
    assert not torch.allclose(base, rt.latency_hidden(request, 2, token(rt, 1)))
    assert not torch.allclose(base, rt.latency_hidden(request, 3, token(rt, 0)))


def test_stage2_may_not_change_the_stage1_choices(rt: AdaptiveMolmoe) -> None:
    request = rt.processor(QUESTION, [image()], max_crops=3)
    wrong = DeferredPlan(3, 2, token(rt), lambda _: Plan(max_crops=3, top_k=4, n_blocks=7, insert_pos=1))
    with pytest.raises(ValueError, match="changes the stage-1 choices"):
        rt.run(request, wrong, GEN)
    invalid = DeferredPlan(3, 3, token(rt), lambda _: Plan(max_crops=3, top_k=4, n_blocks=6, insert_pos=3))
    with pytest.raises(ValueError, match="n_blocks must be in 8..8 for insert_pos 3"):
        rt.run(request, invalid, GEN)
    with pytest.raises(ValueError, match="schedule override needs a complete Plan"):
        rt.run(request, wrong, GEN, schedule=rt.schedule(rt.knobs.full_plan(3)))


def test_skipped_blocks_get_no_cache_with_a_deferred_plan(rt: AdaptiveMolmoe, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = Plan(max_crops=3, top_k=4, n_blocks=7, insert_pos=2)
    caches = []
    new_cache = rt.model.new_cache
    monkeypatch.setattr(rt.model, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    request = rt.processor(QUESTION, [image()], max_crops=3)
    rt.run(request, DeferredPlan(3, 2, token(rt), lambda _: plan), GEN)
    assert set(caches[0].k) == set(rt.schedule(plan).blocks) and len(caches[0].k) == 7


def test_question_summary_is_the_mean_embedding_row(rt: AdaptiveMolmoe) -> None:
    table = rt.model.model.transformer.wte.embedding
    torch.testing.assert_close(rt.question_summary([1, 3]), (table[1] + table[3]).float() / 2)
    assert torch.equal(rt.question_summary([]), torch.zeros(rt.model.config.d_model))
