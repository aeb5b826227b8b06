"""The compiled decode step: one graph per top-k serves every block, schedule and cache size, and changes no
answer; the plugin's `compile` choice and the record of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from lmms_adaptive.controllers.static import StaticController
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig, compiler_available, resolve_compile
from lmms_adaptive.serving.request import Request, serve

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(
        not compiler_available(torch.device("cpu")), reason="torch.compile on the CPU needs a C++ compiler (g++/c++)"
    ),
]

QUESTION = "What is in the image?"


def image(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (90, 120, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def compiled(rt: AdaptiveMolmoe) -> AdaptiveMolmoe:
    """The built-in model's runtime with the compiled decode step, warmed up over the whole plan space."""
    out = AdaptiveMolmoe(rt.model, rt.processor, rt.drop_order, rt.model_id, compile_decode=True)
    out.warmup_decode()
    return out


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_and_eager_decode_agree_for_every_kind_of_plan(rt: AdaptiveMolmoe, compiled: AdaptiveMolmoe) -> None:
    """Uniform and mixed top-k, dropped blocks, a later insertion: same tokens and step logits, and after the
    warm-up no plan compiles anything."""
    gen = GenerationConfig(max_new_tokens=5, stop_at_eos=False, keep_step_logits=True)
    before = graphs()
    for plan in (rt.knobs.full_plan(), Plan(3, 6, 7), Plan(12, 4, 7, 2), Plan(3, 5, 8, 3)):
        eager, fast = (r.generate(QUESTION, [image(2)], plan, gen) for r in (rt, compiled))
        assert fast.token_ids == eager.token_ids, plan
        for a, b in zip(fast.step_logits, eager.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert graphs() == before


def test_a_longer_cache_reuses_the_graphs(rt: AdaptiveMolmoe, compiled: AdaptiveMolmoe) -> None:
    """A request whose KV cache falls in another capacity bucket runs the same graphs (the length is dynamic)."""
    before = graphs()
    gen = GenerationConfig(max_new_tokens=140, stop_at_eos=False)
    out = compiled.generate(QUESTION, [image(3)], Plan(3, 8, 8), gen)
    assert len(out.token_ids) == 140 and graphs() == before


def test_renormalized_plans_compile_on_first_use_and_agree(rt: AdaptiveMolmoe, compiled: AdaptiveMolmoe) -> None:
    gen = GenerationConfig(max_new_tokens=4, stop_at_eos=False, keep_step_logits=True)
    plan = Plan(3, 5, 8, renormalize=True)
    eager, fast = (r.generate(QUESTION, [image(4)], plan, gen) for r in (rt, compiled))
    assert fast.token_ids == eager.token_ids
    torch.testing.assert_close(fast.step_logits[-1], eager.step_logits[-1], rtol=0, atol=1e-4)


def test_the_record_says_whether_the_request_ran_compiled(rt: AdaptiveMolmoe, compiled: AdaptiveMolmoe) -> None:
    plan = Plan(3, 8, 8)
    request = Request(QUESTION, (image(),), gen=GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    assert serve(compiled, StaticController(plan, compiled.knobs), request).record.compiled is True
    assert serve(rt, StaticController(plan, rt.knobs), request).record.compiled is False
    scored = Request(QUESTION, (image(),), continuation="a square")
    assert serve(compiled, StaticController(plan, compiled.knobs), scored).record.compiled is False  # no decode


def test_compile_choice(rt: AdaptiveMolmoe) -> None:
    """auto leaves the tiny built-in model eager (compiling costs it more than it saves); on/off are literal."""
    assert resolve_compile("auto", rt.model) is False
    assert resolve_compile("on", rt.model) is True and resolve_compile(False, rt.model) is False
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        resolve_compile("fast", rt.model)


def test_the_cuda_grouped_path_agrees_and_compiles(rt: AdaptiveMolmoe, monkeypatch) -> None:
    """The CUDA path (`torch._grouped_mm` over the k rows sorted by expert, no host sync) run on the CPU's
    bf16 `_grouped_mm`: the same step as the loop, and traceable in one graph."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    from lmms_adaptive.core import model as core_model

    model = rt.model
    block = model.model.transformer.blocks[1]
    w = core_model.BlockWeights(*(t.to(torch.bfloat16) for t in block.weights()))
    x = torch.randn(1, 1, model.config.d_model, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cache = model.new_cache(20)
    cache.length = 5
    position = torch.tensor([cache.length])
    (k, v), mask = cache.decode_window(1), cache.decode_mask(position)
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    rope, eps = model.rope(position[None]), model.config.layer_norm_eps
    with torch.inference_mode():
        loop = core_model.decode_block(x, w, k.clone(), v.clone(), position, rope, mask, 6, False, eps)
        monkeypatch.setattr(core_model, "can_group_on_device", lambda t: t.dtype == torch.bfloat16)
        grouped = core_model.decode_block(x, w, k.clone(), v.clone(), position, rope, mask, 6, False, eps)
        graph = torch.compile(core_model.decode_block, fullgraph=True)
        traced = graph(x, w, k.clone(), v.clone(), position, rope, mask, 6, False, eps)
    torch.testing.assert_close(grouped.float(), loop.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(traced.float(), grouped.float(), atol=2e-2, rtol=2e-2)
