"""The grpo controller: the learned two-stage policy (budget encoder and two heads) and its inference.

Everything here takes tensors; inserting the latency token into the prefill and reading its hidden
state at block p is the runtime's job (`PolicyRequest.stage2_hidden`).

- The budget (ms) is encoded by a fixed sinusoid over the log-budget (`sinusoidal_budget`), scaled to
  the budget range the policy is trained on, and a trainable MLP to d_model (`BudgetEncoder`); its
  output is the "latency token" embedding.
- Stage 1 (`Stage1Head`, before the vision encoder) sees that budget embedding, a summary of the
  question (the mean of the model's own embedding rows) and cheap request facts (`request_features`),
  and gives the tier and the insertion position. It reads the trained budget embedding rather than
  the raw sinusoid: one budget representation for both stages and the latency token, and the MLP
  turns the sinusoid into what the heads need.
- Stage 2 (`Stage2Head`, at block p) sees the latency token's hidden state there, the budget
  embedding, the request facts and the stage-1 choices, and gives top-k and the number of active
  blocks; block counts that `KnobSpace.block_options(p)` forbids get -inf logits.
- Each stage's two knobs form one categorical over their pairs (`KnobPair`), read as the first knob's
  marginal and the second's conditional, so a plan's log-probability is the sum of four categorical
  log-probabilities.
- Question summaries, request facts and hidden states are standardised per dimension by statistics
  gathered in training (`RunningNorm`, saved with the weights).
- `TwoStagePolicy` samples or picks greedy `Plan`s, scores plans (`log_prob`) and round-trips through
  a self-describing controller artifact (`to_artifact` / `from_artifact`).

Budgets outside the range the policy was trained on are clamped to it (a warning is logged once per
policy): the heads have never seen such budgets, and the edge of the trained range is the closest
behaviour they have learned.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from lmms_adaptive.controllers.base import ArtifactError, Controller, Model, Stage1, artifact_header, knob_space_json
from lmms_adaptive.core.plan import KnobSpace, Plan, RequestFacts

log = logging.getLogger(__name__)

ARTIFACT_KIND = "grpo"
ARTIFACT_FORMAT = 1
SINUSOID_MIN_MS = 1.0
SINUSOID_MAX_MS = 100_000.0
SINUSOID_FREQ_RATIO = 100.0
NORM_CLIP = 5.0


def sinusoidal_budget(
    budget_ms: Tensor, dim: int = 256, min_ms: float = SINUSOID_MIN_MS, max_ms: float = SINUSOID_MAX_MS
) -> Tensor:
    """Fixed encoding of budgets (ms), shape [..., dim]: sines then cosines of the log-budget.

    The log-budget is scaled to t in 0..1 over min_ms..max_ms; by default 1 ms .. 100 s, where the
    10 ms .. 10 s of interest sit at t = 0.2 .. 0.8. The dim/2 angular frequencies grow geometrically
    from pi/2 (the slowest pair turns a quarter period over the whole range, so it alone orders every
    budget in it without aliasing) to SINUSOID_FREQ_RATIO * pi/2 (25 periods over the range). The
    policy passes its trained range, so all frequencies vary across the budgets it sees: over the
    default range most pairs would be near-constant or alias within a training range like 100..400 ms
    (and the synthetic test's policy learns slower that way). Budgets <= 0 encode as min_ms.
    """
    if dim % 2:
        raise ValueError(f"the sinusoid dimension must be even, got {dim}")
    span = math.log(max_ms / min_ms)
    t = torch.log(budget_ms.double().clamp(min=min_ms) / min_ms) / span
    steps = torch.arange(dim // 2, dtype=torch.float64, device=budget_ms.device) / max(dim // 2 - 1, 1)
    freqs = (math.pi / 2) * SINUSOID_FREQ_RATIO**steps
    angles = t[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


class BudgetEncoder(nn.Module):
    """Budget (ms) -> latency-token embedding: sinusoid -> LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(
        self,
        d_model: int,
        sinusoid_dim: int = 256,
        hidden: int = 256,
        min_ms: float = SINUSOID_MIN_MS,
        max_ms: float = SINUSOID_MAX_MS,
    ) -> None:
        super().__init__()
        self.sinusoid_dim, self.min_ms, self.max_ms = sinusoid_dim, min_ms, max_ms
        self.mlp = nn.Sequential(
            nn.LayerNorm(sinusoid_dim), nn.Linear(sinusoid_dim, hidden), nn.GELU(), nn.Linear(hidden, d_model)
        )

    def forward(self, budget_ms: Tensor) -> Tensor:
        return self.mlp(sinusoidal_budget(budget_ms, self.sinusoid_dim, self.min_ms, self.max_ms))


def request_feature_dim(knobs: KnobSpace) -> int:
    return 2 * len(knobs.tiers) + 2


def request_features(facts: RequestFacts, knobs: KnobSpace) -> Tensor:
    """Cheap request facts as a float vector of log1p counts: prompt tokens per tier (tier order), ViT
    crops per tier, text tokens, max_new_tokens."""
    missing = [t for t in knobs.tiers if t not in facts.prompt_tokens_per_tier or t not in facts.crops_per_tier]
    if missing:
        raise ValueError(
            f"request facts lack prompt tokens or crops for tiers {missing} (knob space tiers {list(knobs.tiers)})"
        )
    counts = [facts.prompt_tokens_per_tier[t] for t in knobs.tiers] + [facts.crops_per_tier[t] for t in knobs.tiers]
    counts += [facts.text_tokens, facts.max_new_tokens]
    return torch.log1p(torch.tensor(counts, dtype=torch.float32))


class RunningNorm(nn.Module):
    """Per-dimension standardisation by the mean and variance of the inputs seen in training, clipped to
    +-NORM_CLIP. `update` adds a batch to the statistics (buffers, so they travel with the weights).

    Hidden states and embedding means are dominated by directions every request shares; standardising
    each dimension over requests exposes what differs between them, whatever the model's scale.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Chan et al.'s parallel update of mean and sum of squared deviations with a batch [B, n]."""
        x = x.detach().double().reshape(-1, self.mean.shape[0])
        n, batch_mean = x.shape[0], x.mean(dim=0)
        delta, total = batch_mean - self.mean, self.count + n
        self.m2 += ((x - batch_mean) ** 2).sum(dim=0) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count += n

    def forward(self, x: Tensor) -> Tensor:
        var = self.m2 / self.count if self.count > 0 else torch.ones_like(self.m2)
        std = var.sqrt().clamp(min=1e-6)
        return ((x.double() - self.mean) / std).clamp(-NORM_CLIP, NORM_CLIP).to(x.dtype)


def _trunk(n_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())


class Stage1Head(nn.Module):
    """(budget embedding, question summary, request features) -> joint logits of
    (tier, insertion position) [B, tiers, positions].

    The question summary and features arrive standardised (`RunningNorm`); the budget embedding is
    LayerNorm-ed, as its scale is that of a token embedding (small).
    """

    def __init__(self, knobs: KnobSpace, d_model: int, hidden: int = 128) -> None:
        super().__init__()
        self.n_tiers, self.n_positions = len(knobs.tiers), len(knobs.insert_positions)
        self.budget_norm = nn.LayerNorm(d_model)
        self.trunk = _trunk(2 * d_model + request_feature_dim(knobs), hidden)
        self.out = nn.Linear(hidden, self.n_tiers * self.n_positions)

    def forward(self, budget_emb: Tensor, question: Tensor, features: Tensor) -> Tensor:
        h = self.trunk(torch.cat([self.budget_norm(budget_emb), question, features], dim=-1))
        return self.out(h).unflatten(-1, (self.n_tiers, self.n_positions))


class Stage2Head(nn.Module):
    """(budget embedding, latency-token hidden state at block p, request features, stage-1 choices)
    -> joint logits of (top-k, active blocks) [B, top-k options, block choices], the block counts
    invalid for p masked with -inf. The hidden state and features arrive standardised (`RunningNorm`),
    the budget embedding is LayerNorm-ed."""

    def __init__(self, knobs: KnobSpace, d_model: int, hidden: int = 128) -> None:
        super().__init__()
        self.n_tiers, self.n_positions = len(knobs.tiers), len(knobs.insert_positions)
        self.n_top_k, blocks = len(knobs.top_k_options), knobs.block_choices()
        valid = torch.tensor([[b in knobs.block_options(p) for b in blocks] for p in knobs.insert_positions])
        self.register_buffer("block_valid", valid, persistent=False)  # [positions, block choices]
        self.budget_norm = nn.LayerNorm(d_model)
        self.trunk = _trunk(2 * d_model + request_feature_dim(knobs) + self.n_tiers + self.n_positions, hidden)
        self.out = nn.Linear(hidden, self.n_top_k * len(blocks))

    def forward(
        self, budget_emb: Tensor, hidden_state: Tensor, features: Tensor, tier_idx: Tensor, pos_idx: Tensor
    ) -> Tensor:
        stage1 = [nn.functional.one_hot(tier_idx, self.n_tiers), nn.functional.one_hot(pos_idx, self.n_positions)]
        x = torch.cat([self.budget_norm(budget_emb), hidden_state, features, *(s.float() for s in stage1)], dim=-1)
        h = self.trunk(x)
        logits = self.out(h).unflatten(-1, (self.n_top_k, -1))
        return logits.masked_fill(~self.block_valid[pos_idx][:, None, :], float("-inf"))


@dataclass(frozen=True)
class Categorical:
    """A batch of categorical distributions over option indices; `logits` are normalised log-probs [B, n],
    -inf for impossible options."""

    logits: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor) -> Categorical:
        return cls(torch.log_softmax(logits, dim=-1))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One index per row, drawn on the CPU (a seeded CPU generator serves a policy on any device)."""
        probs = self.logits.detach().exp().cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(self.logits.device)

    def log_prob(self, index: Tensor) -> Tensor:
        return self.logits.gather(-1, index[..., None]).squeeze(-1)

    def entropy(self) -> Tensor:
        finite = self.logits.clamp(min=torch.finfo(self.logits.dtype).min)  # 0 * -inf would be nan
        return -(self.logits.exp() * finite).sum(dim=-1)


@dataclass(frozen=True)
class KnobPair:
    """The two knobs of one stage (stage 1: tier and insertion position; stage 2: top-k and active
    blocks) as one categorical over their pairs, read as the first knob's marginal and the second's
    conditional. One logit per pair sends credit straight to the pairs that fit a budget together
    (top-k 8 only with fewer blocks) rather than through a marginal that a good option's bad partners
    drag down while the conditional is still being learned."""

    joint: Tensor  # [B, n_first, n_second] normalised log-probabilities, -inf for impossible pairs

    @classmethod
    def from_logits(cls, logits: Tensor) -> KnobPair:
        return cls(torch.log_softmax(logits.flatten(1), dim=-1).view_as(logits))

    @property
    def first(self) -> Categorical:
        return Categorical(torch.logsumexp(self.joint, dim=-1))

    def second(self, first_idx: Tensor) -> Categorical:
        rows = self.joint[torch.arange(first_idx.shape[0], device=first_idx.device), first_idx]
        return Categorical(rows - torch.logsumexp(rows, dim=-1, keepdim=True))

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self._split(Categorical(self.joint.flatten(1)).sample(generator))

    def mode(self) -> tuple[Tensor, Tensor]:
        """The most likely pair."""
        return self._split(self.joint.flatten(1).argmax(dim=-1))

    def log_prob(self, first_idx: Tensor, second_idx: Tensor) -> Tensor:
        return self.joint[torch.arange(first_idx.shape[0], device=first_idx.device), first_idx, second_idx]

    def entropy(self) -> Tensor:
        return Categorical(self.joint.flatten(1)).entropy()

    def _split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        n_second = self.joint.shape[-1]
        return flat // n_second, flat % n_second


HiddenFn = Callable[[int, int, Tensor], Tensor]
"""(max_crops, insert_pos, latency token [d_model]) -> the latency token's hidden state at block insert_pos [d_model]."""


@dataclass(frozen=True, eq=False)
class PolicyRequest:
    """What the policy sees of one request. `stage2_hidden` runs (or looks up) the model up to block p
    with the latency token inserted; environments may subclass this to carry their own data."""

    budget_ms: float
    question: Tensor  # [d_model], see AdaptiveMolmoe.question_summary
    features: Tensor  # [n_features], see request_features
    stage2_hidden: HiddenFn


@dataclass(frozen=True, eq=False)
class Rollout:
    """Plans decided for one request, the stage-2 hidden states they were decided on, and the policy's
    log-probability and entropy (as in `evaluate`) when it decided them."""

    plans: tuple[Plan, ...]
    hidden: Tensor  # [n, d_model]
    log_prob: Tensor  # [n]
    entropy: Tensor  # [n]


@dataclass(frozen=True)
class PolicyDims:
    d_model: int
    sinusoid_dim: int = 256
    encoder_hidden: int = 256
    head_hidden: int = 128


class TwoStagePolicy(nn.Module):
    """Budget encoder + stage-1 and stage-2 heads over one knob space. Tensor arguments are batched
    (leading dimension B); budgets are clamped to `budget_range_ms`, the range trained on."""

    def __init__(self, knobs: KnobSpace, dims: PolicyDims, budget_range_ms: tuple[float, float]) -> None:
        super().__init__()
        low, high = budget_range_ms
        if not 0 < low < high:
            raise ValueError(f"the budget range must satisfy 0 < low < high, got {budget_range_ms}")
        self.knobs, self.dims, self.budget_range_ms = knobs, dims, (float(low), float(high))
        self.block_choices = knobs.block_choices()
        self.budget_encoder = BudgetEncoder(dims.d_model, dims.sinusoid_dim, dims.encoder_hidden, low, high)
        self.stage1 = Stage1Head(knobs, dims.d_model, dims.head_hidden)
        self.stage2 = Stage2Head(knobs, dims.d_model, dims.head_hidden)
        self.question_norm = RunningNorm(dims.d_model)
        self.feature_norm = RunningNorm(request_feature_dim(knobs))
        self.hidden_norm = RunningNorm(dims.d_model)
        self._warned_range = False

    def clamp_budget(self, budget_ms: Tensor) -> Tensor:
        low, high = self.budget_range_ms
        outside = (budget_ms < low) | (budget_ms > high)
        if not self._warned_range and bool(outside.any()):
            log.warning(
                "budget %s ms is outside the range this policy was trained on (%g..%g ms): clamping to it",
                budget_ms[outside][0].item(),
                low,
                high,
            )
            self._warned_range = True
        return budget_ms.clamp(low, high)

    def observe(self, question: Tensor, features: Tensor, hidden: Tensor) -> None:
        """Add training inputs ([B, d_model], [B, n_features], [B, d_model]) to the input statistics."""
        self.question_norm.update(question)
        self.feature_norm.update(features)
        self.hidden_norm.update(hidden)

    def latency_token(self, budget_ms: Tensor) -> Tensor:
        """The latency-token embedding [B, d_model] to insert into the prefill."""
        return self.budget_encoder(self.clamp_budget(budget_ms))

    def stage1_dist(self, budget_ms: Tensor, question: Tensor, features: Tensor) -> KnobPair:
        """Tier (over knobs.tiers), then insertion position (over knobs.insert_positions)."""
        return self._stage1(self.latency_token(budget_ms), question, features)

    def stage2_dist(
        self, budget_ms: Tensor, hidden: Tensor, features: Tensor, max_crops: Tensor, insert_pos: Tensor
    ) -> KnobPair:
        """Top-k (over knobs.top_k_options), then active blocks (over `block_choices`), given the stage-1
        choices as values (max_crops, insert_pos), each [B]."""
        tier_idx, tier_ok = _indices(self.knobs.tiers, max_crops)
        pos_idx, pos_ok = _indices(self.knobs.insert_positions, insert_pos)
        if not (tier_ok.all() and pos_ok.all()):
            raise ValueError(
                f"stage-1 choices must be tiers {list(self.knobs.tiers)} and insertion positions "
                f"{list(self.knobs.insert_positions)}, got {max_crops.tolist()} and {insert_pos.tolist()}"
            )
        return self._stage2(self.latency_token(budget_ms), hidden, features, tier_idx, pos_idx)

    def log_prob(
        self, plans: Sequence[Plan], budget_ms: Tensor, question: Tensor, features: Tensor, hidden: Tensor
    ) -> Tensor:
        """Log-probability [B] of each plan (sum over the four knobs); -inf for a plan the policy cannot
        produce (a value outside the knob options, or a block count invalid for its insertion position)."""
        return self.evaluate(plans, budget_ms, question, features, hidden)[0]

    def evaluate(
        self, plans: Sequence[Plan], budget_ms: Tensor, question: Tensor, features: Tensor, hidden: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(log_prob [B], entropy [B]). The entropy is stage 1's plus stage 2's given the plan's stage-1
        choices (a one-sample estimate of the entropy over whole plans when the plans are samples)."""
        idx, known = self._plan_indices(plans)
        token = self.latency_token(budget_ms)
        s1 = self._stage1(token, question, features)
        s2 = self._stage2(token, hidden, features, idx[:, 0], idx[:, 1])
        total = s1.log_prob(idx[:, 0], idx[:, 1]) + s2.log_prob(idx[:, 2], idx[:, 3])
        entropy = s1.entropy() + s2.entropy()
        return torch.where(known, total, torch.full_like(total, float("-inf"))), entropy

    def sample(self, request: PolicyRequest, n: int = 1, generator: torch.Generator | None = None) -> Rollout:
        """n plans for one request, each drawn from stage 1 then stage 2 (no gradients)."""
        return self.sample_groups([request], n, generator)[0]

    def sample_groups(
        self, requests: Sequence[PolicyRequest], n: int, generator: torch.Generator | None = None
    ) -> list[Rollout]:
        """n plans for each request, all requests in one batch (no gradients)."""
        return self._sample(requests, n, generator)

    def greedy(self, request: PolicyRequest) -> Plan:
        """The most likely stage-1 pair, then the most likely stage-2 pair given it."""
        token = self.budget_token(request.budget_ms)
        max_crops, insert_pos = self.greedy_stage1(token, request.question, request.features)
        hidden = request.stage2_hidden(max_crops, insert_pos, token)
        return self.greedy_stage2(token, hidden, request.features, max_crops, insert_pos)

    @torch.inference_mode()
    def budget_token(self, budget_ms: float) -> Tensor:
        """The latency-token embedding [d_model] of one budget (clamped to the trained range)."""
        return self.latency_token(torch.tensor([float(budget_ms)], device=self.question_norm.mean.device))[0]

    @torch.inference_mode()
    def greedy_stage1(self, token: Tensor, question: Tensor, features: Tensor) -> tuple[int, int]:
        """(max_crops, insert_pos) of the most likely stage-1 pair for one request: its latency-token
        embedding, question summary [d_model] and features [n_features]."""
        tier_idx, pos_idx = self._stage1(*self._one(token, question, features)).mode()
        return self.knobs.tiers[int(tier_idx)], self.knobs.insert_positions[int(pos_idx)]

    @torch.inference_mode()
    def greedy_stage2(self, token: Tensor, hidden: Tensor, features: Tensor, max_crops: int, insert_pos: int) -> Plan:
        """The most likely (top-k, active blocks) given the latency token's hidden state [d_model] at block p."""
        if max_crops not in self.knobs.tiers or insert_pos not in self.knobs.insert_positions:
            raise ValueError(
                f"stage-1 choices must be tiers {list(self.knobs.tiers)} and insertion positions "
                f"{list(self.knobs.insert_positions)}, got {max_crops} and {insert_pos}"
            )
        choices = torch.tensor([[self.knobs.tiers.index(max_crops), self.knobs.insert_positions.index(insert_pos)]])
        token, hidden, features = self._one(token, hidden, features)
        choices = choices.to(token.device)
        k_idx, b_idx = self._stage2(token, hidden, features, choices[:, 0], choices[:, 1]).mode()
        return Plan(max_crops, self.knobs.top_k_options[int(k_idx)], self.block_choices[int(b_idx)], insert_pos)

    def _one(self, *vectors: Tensor) -> tuple[Tensor, ...]:
        """Unbatched vectors as a batch of one, float32 on the policy's device."""
        device = self.question_norm.mean.device
        return tuple(v.to(device, torch.float32)[None] for v in vectors)

    def request_batch(self, request: PolicyRequest, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(budget_ms [n], question [n, d], features [n, F]) of one request repeated n times."""
        device = self.question_norm.mean.device
        budget = torch.full((n,), float(request.budget_ms), device=device)
        question, features = (x.to(device, torch.float32).expand(n, -1) for x in (request.question, request.features))
        return budget, question, features

    def _stage1(self, token: Tensor, question: Tensor, features: Tensor) -> KnobPair:
        return KnobPair.from_logits(self.stage1(token, self.question_norm(question), self.feature_norm(features)))

    def _stage2(self, token: Tensor, hidden: Tensor, features: Tensor, tier_idx: Tensor, pos_idx: Tensor) -> KnobPair:
        hidden, features = self.hidden_norm(hidden), self.feature_norm(features)
        return KnobPair.from_logits(self.stage2(token, hidden, features, tier_idx, pos_idx))

    @torch.no_grad()
    def _sample(self, requests: Sequence[PolicyRequest], n: int, generator: torch.Generator | None) -> list[Rollout]:
        budget_ms, question, features = (
            torch.cat(parts) for parts in zip(*(self.request_batch(r, n) for r in requests))
        )
        token = self.latency_token(budget_ms)
        s1 = self._stage1(token, question, features)
        tier_idx, pos_idx = s1.sample(generator)
        chosen = list(zip(tier_idx.tolist(), pos_idx.tolist()))
        rows = []
        for i, request in enumerate(requests):
            states: dict[tuple[int, int], Tensor] = {}  # one stage-2 run per distinct stage-1 choice
            for t, p in chosen[i * n : (i + 1) * n]:
                if (t, p) not in states:
                    tier, pos = self.knobs.tiers[t], self.knobs.insert_positions[p]
                    states[(t, p)] = request.stage2_hidden(tier, pos, token[i * n]).to(token.device, torch.float32)
                rows.append(states[(t, p)])
        hidden = torch.stack(rows)
        s2 = self._stage2(token, hidden, features, tier_idx, pos_idx)
        k_idx, b_idx = s2.sample(generator)
        log_prob = s1.log_prob(tier_idx, pos_idx) + s2.log_prob(k_idx, b_idx)
        entropy = s1.entropy() + s2.entropy()
        plans = [
            Plan(
                max_crops=self.knobs.tiers[t],
                top_k=self.knobs.top_k_options[k],
                n_blocks=self.block_choices[b],
                insert_pos=self.knobs.insert_positions[p],
            )
            for (t, p), k, b in zip(chosen, k_idx.tolist(), b_idx.tolist())
        ]
        return [
            Rollout(tuple(plans[i * n : (i + 1) * n]), *(x[i * n : (i + 1) * n] for x in (hidden, log_prob, entropy)))
            for i in range(len(requests))
        ]

    def _plan_indices(self, plans: Sequence[Plan]) -> tuple[Tensor, Tensor]:
        """Option indices [B, 4] (tier, position, top-k, blocks; 0 where unknown) and whether all are known [B]."""
        device = self.question_norm.mean.device
        order = ("max_crops", "insert_pos", "top_k", "n_blocks")  # stage 1's pair, then stage 2's
        columns = [
            _indices(self.knobs.options(knob), torch.tensor([getattr(p, knob) for p in plans], device=device))
            for knob in order
        ]
        idx = torch.stack([c[0] for c in columns], dim=1)
        known = torch.stack([c[1] for c in columns], dim=1).all(dim=1)
        return idx, known

    def to_artifact(
        self, model_fingerprint: str, *, device: str | None = None, training: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A self-describing controller artifact (JSON-serialisable, read by `controllers.read_artifact`).

        The weights are inlined as base64 safetensors bytes so the file cannot be separated from them
        (about 9 MB of JSON for d_model 2048 with the default dims).
        """
        weights = save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()})
        return {
            **artifact_header(ARTIFACT_KIND, model_fingerprint, self.knobs),
            "format": ARTIFACT_FORMAT,
            "device": device,
            "dims": asdict(self.dims),
            "budget_range_ms": list(self.budget_range_ms),
            "training": training or {},
            "weights": {
                "format": "safetensors",
                "encoding": "base64",
                "data": base64.b64encode(weights).decode("ascii"),
            },
        }

    @classmethod
    def from_artifact(cls, artifact: dict[str, Any], knobs: KnobSpace) -> TwoStagePolicy:
        """The policy of an artifact (as returned by `controllers.read_artifact`) for this knob space."""
        if artifact.get("kind") != ARTIFACT_KIND or artifact.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(
                f"not a {ARTIFACT_KIND} controller artifact of format {ARTIFACT_FORMAT}: "
                f"kind {artifact.get('kind')!r}, format {artifact.get('format')!r}"
            )
        if artifact["knob_space"] != knob_space_json(knobs):
            raise ArtifactError(
                f"the artifact's knob space {artifact['knob_space']} differs from {knob_space_json(knobs)}"
            )
        try:
            low, high = artifact["budget_range_ms"]
            policy = cls(knobs, PolicyDims(**artifact["dims"]), (low, high))
            policy.load_state_dict(load_safetensors(base64.b64decode(artifact["weights"]["data"])))
        except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
            raise ArtifactError(f"malformed {ARTIFACT_KIND} controller artifact: {err}") from err
        return policy


def _indices(options: Sequence[int], values: Tensor) -> tuple[Tensor, Tensor]:
    """Index of each value in options (0 where absent) and whether it is present."""
    table = torch.tensor(options, device=values.device)
    match = values[..., None] == table
    return match.int().argmax(dim=-1), match.any(dim=-1)


class GRPOController(Controller):
    """The learned two-stage controller at inference: the policy's most likely choices.

    Stage 1 reads the budget, the question (mean token embedding, `question_summary`) and the request
    facts, and returns the tier, the insertion position and the latency-token embedding; the runtime
    inserts that token and calls stage 2 with its hidden state at block p for top-k and active blocks.
    """

    kind = ARTIFACT_KIND
    needs_budget = True

    def __init__(self, policy: TwoStagePolicy, question_summary: Callable[[Sequence[int]], Tensor]) -> None:
        self.policy = policy.eval()
        self.question_summary = question_summary
        self._tokens: dict[float, Tensor] = {}

    def stage1(self, facts: RequestFacts) -> Stage1:
        token = self._token(facts)
        features = request_features(facts, self.policy.knobs)
        question = self.question_summary(facts.question_ids)
        max_crops, insert_pos = self.policy.greedy_stage1(token, question, features)
        return Stage1(max_crops, insert_pos, latency_token=token)

    def stage2(self, facts: RequestFacts, first: Stage1, hidden: Tensor) -> Plan:
        features = request_features(facts, self.policy.knobs)
        return self.policy.greedy_stage2(first.latency_token, hidden, features, first.max_crops, first.insert_pos)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "budget_range_ms": list(self.policy.budget_range_ms)}

    def _token(self, facts: RequestFacts) -> Tensor:
        """The budget's latency-token embedding, computed once per budget (requests usually share one)."""
        if facts.budget_ms is None:
            raise ValueError("the grpo controller needs a latency budget per request (model_args budget=<ms>)")
        if facts.budget_ms not in self._tokens:
            self._tokens[facts.budget_ms] = self.policy.budget_token(facts.budget_ms)
        return self._tokens[facts.budget_ms]


def from_artifact(artifact: dict[str, Any], model: Model) -> GRPOController:
    return GRPOController(TwoStagePolicy.from_artifact(artifact, model.knobs), model.question_summary)
