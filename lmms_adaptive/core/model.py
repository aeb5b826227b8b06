"""MolmoE in plain PyTorch: CLIP ViT + attention pooling + projector + OLMoE decoder with a static KV cache.

The module tree mirrors the original parameter names (`model.transformer.blocks.{i}.attn.att_proj.weight`,
...), except that each block's 64 experts live in two stacked tensors (`Experts.gate_up`, `Experts.down`)
and that experts and the LM head are stored input-major (one-row products stream them); `weight_slots()` maps
every original name to the tensor or transposed view that holds it, and is the one place checkpoints are
loaded into and saved from.

Per request the decoder runs a `LayerSchedule`: which blocks run, in order, and each one's MoE top-k.
A block that is not in the schedule runs neither at prefill nor at decode and gets no KV cache. Prefill runs
the block modules; a decode step runs `decode_block` per scheduled block with that block's tensors as inputs,
so one compiled graph of it serves every block and schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmms_adaptive.core.config import MolmoeConfig, VisionConfig


@dataclass(frozen=True)
class LayerSchedule:
    """The decoder's execution for one request: (block index, MoE top-k) for each active block, in order."""

    layers: tuple[tuple[int, int], ...]
    renormalize: bool = False

    @classmethod
    def full(cls, config: MolmoeConfig, top_k: int | None = None) -> LayerSchedule:
        k = config.moe_top_k if top_k is None else top_k
        return cls(tuple((i, k) for i in range(config.n_layers)))

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.layers)


class RMSNorm(nn.Module):
    """OLMo's RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Vision
# ----------------------------------------------------------------------------------------------------


class ViTAttention(nn.Module):
    """Multi-head attention with biases; used by the ViT blocks and by the 2x2 pooling (query != keys)."""

    def __init__(self, in_dim: int, n_heads: int, head_dim: int, out_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.wq = nn.Linear(in_dim, inner)
        self.wk = nn.Linear(in_dim, inner)
        self.wv = nn.Linear(in_dim, inner)
        self.wo = nn.Linear(inner, out_dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2).float()

    def forward(self, q_in: Tensor, kv_in: Tensor) -> Tensor:
        q, k, v = self._heads(self.wq(q_in)), self._heads(self.wk(kv_in)), self._heads(self.wv(kv_in))
        out = F.scaled_dot_product_attention(q, k, v)  # fp32, as the original's float32_attention
        return self.wo(out.transpose(1, 2).flatten(2).to(q_in.dtype))


class ViTMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention = ViTAttention(cfg.width, cfg.n_heads, cfg.head_dim, cfg.width)
        self.feed_forward = ViTMLP(cfg.width, cfg.mlp_dim)
        self.attention_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attention_norm(x)
        x = x + self.attention(h, h)
        return x + self.feed_forward(self.ffn_norm(x))


class ViTStack(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))


class VisionTransformer(nn.Module):
    """OpenAI CLIP ViT (pre-LN, no post-LN); returns every block's output."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.n_positions, cfg.width))
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.width, bias=False)
        self.pre_ln = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.transformer = ViTStack(cfg)

    def forward(self, patches: Tensor) -> list[Tensor]:
        x = self.patch_embedding(patches)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.pre_ln(x)
        hidden = []
        for block in self.transformer.resblocks:
            x = block(x)
            hidden.append(x)
        return hidden


class Projector(nn.Module):
    """SwiGLU connector from pooled ViT features to d_model."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        v = config.vision
        self.vit_layers = config.vit_layers
        self.image_vit = VisionTransformer(v)
        self.image_pooling_2d = ViTAttention(config.image_feature_dim, v.n_heads, v.head_dim, v.width)
        self.image_projector = Projector(v.width, config.expert_hidden, config.d_model)
        self.pad_embed = nn.Parameter(torch.zeros(2, config.image_feature_dim))

    def forward(self, images: Tensor, image_masks: Tensor) -> Tensor:
        """images [T, patches, patch_dim], image_masks [T, patches] -> features [T, pooled, d_model]."""
        n_crops, n_patches, _ = images.shape
        is_crop = ~(images == -1).all(dim=(1, 2))  # all -1 crops are batch padding
        hidden = self.image_vit(images)
        feats = torch.cat([hidden[layer] for layer in self.vit_layers], dim=-1)[:, 1:]
        feats = feats * is_crop[:, None, None].to(feats.dtype)
        all_pad = (image_masks == 0).to(feats.dtype)[..., None]
        partial_pad = ((image_masks < 1) & (image_masks != 0)).to(feats.dtype)[..., None]
        feats = feats + self.pad_embed[0].to(feats.dtype) * all_pad + self.pad_embed[1].to(feats.dtype) * partial_pad
        side = math.isqrt(n_patches)
        pooled_side = side // 2
        windows = (
            feats.view(n_crops, pooled_side, 2, pooled_side, 2, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n_crops * pooled_side * pooled_side, 4, -1)
        )
        pooled = self.image_pooling_2d(windows.mean(dim=1, keepdim=True), windows)
        return self.image_projector(pooled.view(n_crops, pooled_side * pooled_side, -1))


# ----------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Llama-style RoPE cos/sin in fp32 for positions [B, T] -> [B, 1, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys/values of one request, preallocated to `max_len` per block on the block's first write: blocks a
    plan skips get none, and a plan decided at block p (stage 2) needs no block list up front."""

    BUCKET = 128  # capacity rounds up to a multiple of this: decode shapes repeat across requests

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, like: Tensor):
        max_len = -(-max_len // self.BUCKET) * self.BUCKET
        # one spare slot past the capacity: a decode window is then never the whole buffer, so a compiled
        # step sees one memory layout (a window equal to the buffer is contiguous and would compile anew)
        self.shape = (batch, n_heads, max_len + 1, head_dim)
        self.dtype, self.device = like.dtype, like.device
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.length = 0  # positions held for every block that has run (the next token's position)
        self.max_len = max_len

    def buffers(self, block: int) -> tuple[Tensor, Tensor]:
        """The block's whole key and value buffers [batch, heads, max_len, head_dim], zeros on first use."""
        if block not in self.k:
            self.k[block] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.v[block] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.k[block], self.v[block]

    @property
    def decode_slots(self) -> int:
        """The slots a decode token at position `length` attends to: the positions held so far and its own,
        rounded up to a multiple of BUCKET (a compiled step sees a new shape once per bucket, not per token)."""
        return -(-(self.length + 1) // self.BUCKET) * self.BUCKET

    def decode_mask(self, position: Tensor) -> Tensor:
        """The [1, 1, 1, decode_slots] mask that shows a decode token at `position` [1] (= `length`) the slots
        up to its own; the same for every block, so built once per token."""
        return (torch.arange(self.decode_slots, device=position.device) <= position)[None, None, None]

    def decode_window(self, block: int) -> tuple[Tensor, Tensor]:
        """The block's keys and values [batch, heads, decode_slots, head_dim] a decode token attends to."""
        keys, values = self.buffers(block)
        slots = self.decode_slots
        return keys[:, :, :slots], values[:, :, :slots]

    def update(self, block: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a chunk's keys/values at positions start.. and return the block's keys/values up to its end."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        keys, values = self.buffers(block)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.eps = config.n_heads, config.layer_norm_eps
        self.attn_norm = RMSNorm(d, config.layer_norm_eps)
        self.att_proj = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = RMSNorm(d, config.layer_norm_eps)
        self.k_norm = RMSNorm(d, config.layer_norm_eps)
        self.attn_out = nn.Linear(d, d, bias=False)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> queries, keys (rotated) and values, each [B, heads, T, head_dim]."""
        weights = (self.attn_norm.weight, self.att_proj.weight, self.q_norm.weight, self.k_norm.weight)
        return project_qkv(x, *weights, rope, self.n_heads, self.eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | None,
        start: int,
        block: int,
    ) -> Tensor:
        """With a cache, the chunk's keys/values are written at positions `start`.. and it attends to all before."""
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(block, start, k, v)
        if mask is None and q.shape[2] > 1 and start > 0:  # a chunk after cached tokens: offset causal mask
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=start)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.attn_out(out.transpose(1, 2).flatten(2))


def project_qkv(
    x: Tensor,
    attn_norm: Tensor,
    att_proj: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    rope: tuple[Tensor, Tensor],
    n_heads: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, T, D] -> queries, keys (rotated) and values, each [B, heads, T, head_dim]."""
    q, k, v = F.linear(rms_norm(x, attn_norm, eps), att_proj).chunk(3, dim=-1)
    q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)  # QK-norm over the full width, before the head split
    q, k, v = (t.unflatten(-1, (n_heads, -1)).transpose(1, 2) for t in (q, k, v))
    return apply_rope(q, *rope), apply_rope(k, *rope), v


class Experts(nn.Module):
    """All experts of one block, stacked output-major like the checkpoint's per-expert [out, in] matrices:
    gate_up [E, 2H, D] (gate rows then up rows), down [E, D, H]. Each output of a one-token product is then a
    contiguous dot product, which compiled decode reductions stream (docs/speed.md). The checkpoint's
    matrices are views of these (`slots`), so loading writes them in place."""

    def __init__(self, n_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Parameter(torch.zeros(n_experts, 2 * hidden, d_model))
        self.down = nn.Parameter(torch.zeros(n_experts, d_model, hidden))

    def slots(self, prefix: str) -> dict[str, Tensor]:
        """Original per-expert parameter names -> [out, in] views into the stacked tensors."""
        out = {}
        for e in range(self.gate_up.shape[0]):
            out[f"{prefix}.{e}.gate_proj.weight"] = self.gate_up[e, : self.hidden]
            out[f"{prefix}.{e}.up_proj.weight"] = self.gate_up[e, self.hidden :]
            out[f"{prefix}.{e}.down_proj.weight"] = self.down[e]
        return out

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        return apply_experts(x, weights, experts, self.gate_up, self.down)


def apply_experts(x: Tensor, weights: Tensor, experts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x [N, D], weights/experts [N, k] -> [N, D]; the work follows N * k, never all experts."""
    if x.shape[0] == 1:
        return experts_one_token(x, weights, experts, gate_up, down)
    return experts_grouped(x, weights, experts, gate_up, down)


def expert_ffn(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One SwiGLU expert: x [N, D], gate_up [2H, D], down [D, H] -> [N, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def experts_one_token(x: Tensor, weights: Tensor, experts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One token (decode): its k chosen experts applied where their weights lie, no copy of them.
    On CUDA (bf16) one `torch._grouped_mm` over the k rows sorted by expert; elsewhere a loop over the k
    experts indexing views of the stacked weights (one host read of the k indices: free on a CPU)."""
    if can_group_on_device(x):
        return experts_grouped(x, weights, experts, gate_up, down)
    if torch.compiler.is_compiling():  # a graph cannot read the indices on the host
        return experts_indexed(x, weights, experts, gate_up, down)
    out = torch.zeros_like(x)
    for e, w in zip(experts[0].tolist(), weights[0], strict=True):
        out += w * expert_ffn(x, gate_up[e], down[e])
    return out


def experts_indexed(x: Tensor, weights: Tensor, experts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One token through its k experts written as reductions over the indexed weights: traceable (no host
    read), and inductor fuses the indexing into the reduction loops, so the weights are read where they lie
    (as batched products they would first be gathered into a copy); each reduction runs along a contiguous
    row of the output-major weights."""
    chosen = experts[0]
    gate, up = (gate_up[chosen] * x[0]).sum(-1).chunk(2, dim=-1)
    y = (down[chosen] * (F.silu(gate) * up)[:, None, :]).sum(-1)
    return weights @ y


def experts_grouped(x: Tensor, weights: Tensor, experts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Many tokens (prefill): token copies sorted by expert, one product per expert that got any, written
    into preallocated buffers, then summed back per token with one `index_add_`."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = flat.new_zeros(gate_up.shape[0]).index_add_(0, flat, torch.ones_like(flat))  # static shape: traceable
    gate, up = grouped_matmul(x[token], gate_up, counts).chunk(2, dim=-1)
    y = grouped_matmul(F.silu(gate) * up, down, counts) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)


def can_group_on_device(x: Tensor) -> bool:
    """Whether `torch._grouped_mm` (CUDA, bf16) runs the grouped products without a host sync."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of x sorted by group, w [G, out, in], counts [G] -> x_g @ w_g.T for each group g, [rows, out]."""
    if can_group_on_device(x):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    out = x.new_empty(x.shape[0], w.shape[1])
    training = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)  # mm(out=) has no gradient
    start = 0
    for g, size in enumerate(counts.tolist()):  # one host sync per call, then only the groups with rows
        if size:
            rows = slice(start, start + size)
            if training:
                out[rows] = x[rows] @ w[g].T
            else:
                torch.mm(x[rows], w[g].T, out=out[rows])
            start += size
    return out


class MoE(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        self.eps = config.layer_norm_eps
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.gate = nn.Linear(config.d_model, config.moe_num_experts, bias=False)
        self.experts = Experts(config.moe_num_experts, config.d_model, config.expert_hidden)

    def forward(self, x: Tensor, top_k: int, renormalize: bool) -> Tensor:
        h, weights, experts = route(x, self.ff_norm.weight, self.gate.weight, top_k, renormalize, self.eps)
        return self.experts(h, weights, experts).view(x.shape)


def route(
    x: Tensor, ff_norm: Tensor, gate: Tensor, top_k: int, renormalize: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, T, D] -> the normed rows h [N, D] and each row's top-k expert weights and indices [N, k]:
    softmax over all experts in fp32, optionally renormalised over the k."""
    h = rms_norm(x, ff_norm, eps).reshape(-1, x.shape[-1])
    probs = F.softmax(F.linear(h, gate).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return h, weights.to(h.dtype), experts


def moe_ffn(
    x: Tensor, ff_norm: Tensor, gate: Tensor, gate_up: Tensor, down: Tensor, top_k: int, renormalize: bool, eps: float
) -> Tensor:
    """The MoE feed-forward of x [B, T, D] from one block's tensors (what `MoE` computes)."""
    h, weights, experts = route(x, ff_norm, gate, top_k, renormalize, eps)
    return apply_experts(h, weights, experts, gate_up, down).view(x.shape)


class BlockWeights(NamedTuple):
    """One decoder block's tensors, as inputs of `decode_block` (so one compiled step serves every block)."""

    attn_norm: Tensor
    att_proj: Tensor
    q_norm: Tensor
    k_norm: Tensor
    attn_out: Tensor
    ff_norm: Tensor
    gate: Tensor
    gate_up: Tensor
    down: Tensor


class Block(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        self.attn = Attention(config)
        self.mlp = MoE(config)

    def forward(self, x, rope, mask, cache, start: int, block: int, top_k: int, renormalize: bool) -> Tensor:
        x = x + self.attn(x, rope, mask, cache, start, block)
        return x + self.mlp(x, top_k, renormalize)

    def weights(self) -> BlockWeights:
        a, m = self.attn, self.mlp
        return BlockWeights(
            a.attn_norm.weight, a.att_proj.weight, a.q_norm.weight, a.k_norm.weight, a.attn_out.weight,
            m.ff_norm.weight, m.gate.weight, m.experts.gate_up, m.experts.down,
        )  # fmt: skip


def decode_block(
    x: Tensor,
    w: BlockWeights,
    keys: Tensor,
    values: Tensor,
    position: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: Tensor,
    top_k: int,
    renormalize: bool,
    eps: float,
) -> Tensor:
    """One block over one decode token x [1, 1, D] at `position` [1]. `keys`/`values` [1, heads, slots,
    head_dim] are the block's cache window (`KVCache.decode_window`): the token's keys/values are written at
    `position` (in place) and it attends to the slots `mask` [1, 1, 1, slots] shows (`KVCache.decode_mask`).
    Everything a block differs in is an input, so one compiled graph of this function per top-k serves every
    block of every schedule at every position."""
    q, k, v = project_qkv(x, w.attn_norm, w.att_proj, w.q_norm, w.k_norm, rope, keys.shape[1], eps)
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    out = decode_attention(q, keys, values, mask)
    x = x + F.linear(out.transpose(1, 2).flatten(2), w.attn_out)
    return x + moe_ffn(x, w.ff_norm, w.gate, w.gate_up, w.down, top_k, renormalize, eps)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """One query q [1, heads, 1, head_dim] over the cache window keys/values [1, heads, slots, head_dim] where
    `mask` [1, 1, 1, slots] shows it: SDPA on CUDA; on the CPU the plain math (softmax in fp32), which inductor
    fuses into one loop, twice as fast there as the CPU flash kernel for a single query (docs/speed.md)."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    scores = (q @ keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(values.dtype) @ values


class LMHead(nn.Module):
    """The output projection stored input-major, `weight_t` [D, vocab]: a one-row product streams it
    (several times faster on a CPU than the [vocab, D] layout); `weight` is the checkpoint's [vocab, D] view."""

    def __init__(self, d_model: int, vocab: int) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.zeros(d_model, vocab))

    @property
    def weight(self) -> Tensor:
        return self.weight_t.T

    def slots(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.weight": self.weight}

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight_t


DecodeStep = Callable[..., Tensor]  # `decode_block` or a compiled graph of it


class Embedding(nn.Module):
    """The base vocabulary table plus the extra rows (`new_embedding`) appended after it."""

    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(config.embedding_size, config.d_model))
        self.new_embedding = nn.Parameter(torch.zeros(config.additional_vocab_size, config.d_model))

    def forward(self, ids: Tensor) -> Tensor:
        base = self.embedding.shape[0]
        ids = ids.clamp(min=0)  # padding (-1) embeds as id 0, as in the original
        extra = ids >= base
        x = F.embedding(ids.clamp(max=base - 1), self.embedding)
        if extra.any():
            x = torch.where(extra[..., None], F.embedding((ids - base).clamp(min=0), self.new_embedding), x)
        return x


class Transformer(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        self.wte = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.layer_norm_eps)


class MolmoeBackbone(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        self.transformer = Transformer(config)
        self.vision_backbone = VisionBackbone(config)


class MolmoeForCausalLM(nn.Module):
    def __init__(self, config: MolmoeConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MolmoeBackbone(config)
        self.lm_head = LMHead(config.d_model, config.embedding_size)

    # -- weights ----------------------------------------------------------------------------------

    def weight_slots(self) -> dict[str, Tensor]:
        """Every original checkpoint parameter name -> the tensor (or view) that holds it."""
        slots: dict[str, Tensor] = {}
        relaid = set()  # parameters stored in another layout than the checkpoint's (Experts, LMHead)
        for name, module in self.named_modules():
            if isinstance(module, Experts | LMHead):
                slots.update(module.slots(name))
                relaid.update(f"{name}.{p}" for p, _ in module.named_parameters())
        slots.update((name, p) for name, p in self.named_parameters() if name not in relaid)
        return slots

    # -- stages -----------------------------------------------------------------------------------

    def encode_images(self, images: Tensor, image_masks: Tensor) -> Tensor:
        """Vision stage: [T, 576, 588] crops -> [T, 144, d_model] features to add to the prompt."""
        return self.model.vision_backbone(images.to(self.lm_head.weight.dtype), image_masks)

    def embed(
        self, input_ids: Tensor, image_features: Tensor | None = None, image_input_idx: Tensor | None = None
    ) -> Tensor:
        """Token embeddings [B, L, D] with image features ADDED at their `<im_patch>` positions."""
        x = self.model.transformer.wte(input_ids)
        if image_features is not None:
            batch = x.shape[0]
            feats = image_features.reshape(batch, -1, x.shape[-1]).to(x.dtype)
            idx = image_input_idx.reshape(batch, -1)
            valid = idx >= 0
            rows = torch.arange(batch, device=x.device)[:, None].expand_as(idx)
            x = x.index_put((rows[valid], idx[valid]), feats[valid], accumulate=True)
        return x

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(batch, c.n_heads, max_len, c.head_dim, self.lm_head.weight)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta)

    def decode_layers(
        self,
        x: Tensor,
        positions: Tensor,
        schedule: LayerSchedule,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Run the scheduled blocks over x [B, T, D] at `positions` [B, T]; returns the final-normed hidden.
        With a cache the chunk goes after the cached positions, and the cache then holds it too.

        `attention_mask` [B, T] (True = real token) is only needed for padded batches without a cache.
        """
        mask = None
        if attention_mask is not None:
            t = x.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = (causal[None] & attention_mask[:, None, :])[:, None]
        start = cache.length if cache is not None else 0
        x = self.run_blocks(x, self.rope(positions), schedule.layers, schedule.renormalize, cache, start, mask)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_norm(x)

    def run_blocks(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layers: Sequence[tuple[int, int]],
        renormalize: bool,
        cache: KVCache | None = None,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """(block index, top-k) `layers` in order over x, without the final norm; cache writes at `start`.
        `cache.length` is the caller's to advance: a prefill split at block p runs this twice over the same
        positions (see `runtime.AdaptiveMolmoe.run`)."""
        blocks = self.model.transformer.blocks
        for index, top_k in layers:
            x = blocks[index](x, rope, mask, cache, start, index, top_k, renormalize)
        return x

    def decode_token(
        self, x: Tensor, position: Tensor, schedule: LayerSchedule, cache: KVCache, step: DecodeStep = decode_block
    ) -> Tensor:
        """One batch-1 decode step: the embedded token x [1, 1, D] at `position` [1] (int64, `cache.length`)
        -> next-token logits [vocab] in float32; the token's keys/values go into `cache` (which the caller
        advances). Each scheduled block runs `step` (`decode_block`, or one compiled per top-k:
        `compiled_decode_block`) with that block's weights and its cache up to the token's bucket, so attention
        reads the positions held (rounded up), not the cache's capacity."""
        rope, mask = self.rope(position[None]), cache.decode_mask(position)
        blocks = self.model.transformer.blocks
        eps = self.config.layer_norm_eps
        for index, top_k in schedule.layers:
            k, v = cache.decode_window(index)
            x = step(x, blocks[index].weights(), k, v, position, rope, mask, top_k, schedule.renormalize, eps)
        return self.logits(self.final_norm(x)[0, -1]).float()

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.transformer.ln_f(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)


def count_parameters(model: MolmoeForCausalLM) -> int:
    return sum(t.numel() for t in model.weight_slots().values())
