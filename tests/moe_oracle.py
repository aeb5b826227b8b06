"""The test oracle for the MoE: the original implementation's loop over every expert (never the fast path).

`benchmarks/knob_latency.py --reference` times it as the original code's baseline.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_adaptive.core.model import Experts, KVCache, LayerSchedule, MolmoeForCausalLM


def reference_experts(experts: Experts, x: Tensor, weights: Tensor, chosen: Tensor) -> Tensor:
    """x [N, D], weights/chosen [N, k] -> [N, D], one pass per expert whether or not it was chosen."""
    out = torch.zeros_like(x)
    original = experts.slots("experts")  # the checkpoint's [out, in] matrices, whatever the storage layout
    for e in range(experts.gate_up.shape[0]):
        token, slot = torch.where(chosen == e)
        gate = x[token] @ original[f"experts.{e}.gate_proj.weight"].T
        up = x[token] @ original[f"experts.{e}.up_proj.weight"].T
        y = (F.silu(gate) * up) @ original[f"experts.{e}.down_proj.weight"].T
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def module_decode_token(
    model: MolmoeForCausalLM, x: Tensor, position: Tensor, schedule: LayerSchedule, cache: KVCache, step=None
) -> Tensor:
    """`MolmoeForCausalLM.decode_token` through the block modules (whose MoE the oracle replaces), not
    through the fused `decode_block` (which calls no module); `step` is ignored."""
    rope = model.rope(position[None])
    x = model.run_blocks(x, rope, schedule.layers, schedule.renormalize, cache, cache.length)
    return model.logits(model.final_norm(x)[0, -1]).float()


@contextmanager
def reference_moe(model: MolmoeForCausalLM) -> Iterator[None]:
    """Within the block, every MoE of `model` runs `reference_experts` instead of its fast path, at prefill
    and at decode."""
    all_experts = [block.mlp.experts for block in model.model.transformer.blocks]
    for experts in all_experts:
        experts.forward = types.MethodType(reference_experts, experts)
    model.decode_token = types.MethodType(module_decode_token, model)
    try:
        yield
    finally:
        for experts in all_experts:
            del experts.forward
        del model.decode_token
