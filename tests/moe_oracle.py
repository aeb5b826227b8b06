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

from lmms_adaptive.core.model import Experts, MolmoeForCausalLM


def reference_experts(experts: Experts, x: Tensor, weights: Tensor, chosen: Tensor) -> Tensor:
    """x [N, D], weights/chosen [N, k] -> [N, D], one pass per expert whether or not it was chosen."""
    out = torch.zeros_like(x)
    for e in range(experts.gate_up.shape[0]):
        token, slot = torch.where(chosen == e)
        gate, up = (x[token] @ experts.gate_up[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ experts.down[e].T
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


@contextmanager
def reference_moe(model: MolmoeForCausalLM) -> Iterator[None]:
    """Within the block, every MoE of `model` runs `reference_experts` instead of its fast path."""
    all_experts = [block.mlp.experts for block in model.model.transformer.blocks]
    for experts in all_experts:
        experts.forward = types.MethodType(reference_experts, experts)
    try:
        yield
    finally:
        for experts in all_experts:
            del experts.forward
