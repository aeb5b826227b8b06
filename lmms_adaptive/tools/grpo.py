"""GRPO for the two-stage policy: reward, group advantages, the clipped loss, and a generic training loop.

One step (`grpo_step`), for each of several requests: draw a budget log-uniformly from the
configured range, ask the environment for a request under it, sample a group of G plans from the
current policy (stage 1, then stage 2 on the hidden state the environment returns for each stage-1
choice), run each plan, turn (score, latency) into rewards and normalise them within the group. Then
apply `epochs` clipped policy-gradient updates on all the groups together; finally the policy's input
statistics take in the step's requests (after the updates, so one step's sampling and losses all see
the same normalisation). The environment (the real one runs MolmoE and scores with the task's own
`process_results`) only has to implement `Environment`.

Under several processes (`serving.ranks.Ranks`) every rank draws the same requests and plans (same seed, same
weights), runs its share of the plans (each measures its own latencies on its own device), and all ranks get
every result; each computes the loss on its share of the samples, the gradients are summed over the ranks
(the whole batch's gradient) and every rank takes the same step, so the weights stay equal everywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from lmms_adaptive.controllers.grpo import PolicyRequest, Rollout, TwoStagePolicy
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.serving.ranks import SINGLE, Ranks


@dataclass(frozen=True)
class Penalty:
    """What latency costs in the reward, as a fraction of the budget used (`used = latency / budget`):
    `latency_cost * min(used, 1)`, plus `constant + per_overshoot * min(used - 1, cap)` over the budget.

    The within-budget cost makes the policy spend latency only where it buys score: among plans that fit,
    a full budget costs `latency_cost` (a twentieth of an accuracy point by default), so a question that
    the cheapest plan already answers gets the cheapest plan. A constant at least the score range (1 for
    accuracies) makes every violation worse than any plan that fits, whatever its score: the budget is the
    hard constraint. The proportional term then ranks violations by relative overshoot, so a group whose
    plans all miss still learns to miss by less. The cap bounds it: measured latencies have a long tail (a
    request that met load from elsewhere on the machine), and one such run should not outweigh the rest
    of its group.
    """

    constant: float = 1.0
    per_overshoot: float = 1.0
    cap: float = 1.0
    latency_cost: float = 0.05


def reward(score: float, latency_ms: float, budget_ms: float, penalty: Penalty = Penalty()) -> float:
    """Score minus the latency's cost (see `Penalty`; a latency equal to the budget is within it)."""
    used = latency_ms / budget_ms
    within = score - penalty.latency_cost * min(used, 1.0)
    if latency_ms <= budget_ms:
        return within
    return within - penalty.constant - penalty.per_overshoot * min(used - 1.0, penalty.cap)


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """(r - mean) / (std + eps) over the last dimension (one group), population std; `scale=False`: r - mean.

    Scaled, every group weighs the same however small its reward spread: a group that differs only in the
    within-budget latency cost pushes as hard as one where a plan answers and another does not. Centred only,
    groups weigh by their spread. A group whose rewards are all equal carries no preference and gets exactly
    zero advantages (not rounding noise divided by eps).
    """
    mean = rewards.mean(dim=-1, keepdim=True)
    same = rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True)
    centred = rewards - mean
    if scale:
        centred = centred / (rewards.std(dim=-1, correction=0, keepdim=True) + eps)
    return torch.where(same, torch.zeros_like(rewards), centred)


@dataclass(frozen=True)
class LossStats:
    pg_loss: float
    kl: float  # k3 estimate of KL(new || ref); 0 without a reference
    clip_frac: float  # fraction of samples whose clipped term is active (zero gradient)
    ratio_mean: float


def clipped_pg_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    clip_eps: float,
    kl_coef: float = 0.0,
    logp_ref: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """PPO-style clipped objective averaged over the group, plus `kl_coef` times a KL penalty.

    loss = -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)) + kl_coef * mean(k3), with
    ratio = exp(new - old) and k3 = exp(ref - new) - (ref - new) - 1: an unbiased, always non-negative
    per-sample estimator of KL(new || ref) for samples drawn from the policy (zero where new == ref).
    """
    if kl_coef and logp_ref is None:
        raise ValueError("kl_coef > 0 needs the reference policy's log-probabilities (logp_ref)")
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    pg_loss = -torch.minimum(unclipped, clipped).mean()
    kl = torch.zeros((), device=logp_new.device) if logp_ref is None else _k3(logp_new, logp_ref).mean()
    loss = pg_loss + kl_coef * kl if kl_coef else pg_loss
    stats = LossStats(
        pg_loss=pg_loss.item(),
        kl=kl.item(),
        clip_frac=(clipped < unclipped).float().mean().item(),
        ratio_mean=ratio.mean().item(),
    )
    return loss, stats


def _k3(logp_new: Tensor, logp_ref: Tensor) -> Tensor:
    log_ratio = logp_ref - logp_new
    return torch.exp(log_ratio) - log_ratio - 1.0


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 16  # plans sampled per request
    requests_per_step: int = 16  # groups per update: one request alone gives a very noisy direction
    lr: float = 2e-3
    stage1_lr_scale: float = 0.1  # stage-1 head learns this much slower (see `make_optimizer`)
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0: KL to the policy's weights at the start of training (see `train`)
    entropy_coef: float = 0.01  # bonus on the policy's entropy: keeps groups diverse (no early collapse)
    epochs: int = 2  # clipped updates per batch of groups
    scale_advantages: bool = True  # divide each group's centred rewards by its std (see `group_advantages`)
    lr_decay: bool = True  # lr falls linearly to 0 over the run (see `train`)
    max_grad_norm: float = 1.0
    penalty: Penalty = field(default_factory=Penalty)
    budget_range_ms: tuple[float, float] = (100.0, 400.0)  # budgets drawn log-uniformly from it
    seed: int = 0


R = TypeVar("R", bound=PolicyRequest)


class Environment(Protocol[R]):
    """Where plans are tried. `sample_request` picks a training request under the given budget (its
    `stage2_hidden` gives the latency token's hidden state at block p); `run` executes one plan on it
    and returns (score, latency in ms)."""

    def sample_request(self, rng: torch.Generator, budget_ms: float) -> R: ...

    def run(self, request: R, plan: Plan) -> tuple[float, float]: ...


@dataclass(frozen=True)
class StepStats:
    """Means over the step's sampled plans (all groups)."""

    reward_mean: float
    score_mean: float
    latency_mean_ms: float
    violation_rate: float
    entropy: float  # of the policy on the sampled plans, before the update
    updated: bool  # False when no group carried signal (all rewards equal in each, no KL or entropy term)
    loss: LossStats | None  # of the last epoch


def sample_budget(budget_range_ms: tuple[float, float], rng: torch.Generator) -> float:
    low, high = budget_range_ms
    u = torch.rand((), generator=rng, dtype=torch.float64).item()
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def make_optimizer(policy: TwoStagePolicy, cfg: GRPOConfig) -> torch.optim.Adam:
    """Adam with the stage-1 head at `cfg.lr * cfg.stage1_lr_scale`, everything else at `cfg.lr`.

    A stage-1 choice is judged by the plans stage 2 completes it with. While stage 2 is still poor for
    a tier (the high tier fits a budget only with the right top-k and block count), that tier looks worse
    than it is; a stage 1 as fast as stage 2 abandons it before stage 2 has learned to use it.
    """
    stage1 = list(policy.stage1.parameters())
    ids = {id(p) for p in stage1}
    rest = [p for p in policy.parameters() if id(p) not in ids]
    groups = [{"params": stage1, "lr": cfg.lr * cfg.stage1_lr_scale}, {"params": rest, "lr": cfg.lr}]
    return torch.optim.Adam(groups, lr=cfg.lr, foreach=True)


def grpo_step(
    policy: TwoStagePolicy,
    optimizer: torch.optim.Optimizer,
    env: Environment,
    cfg: GRPOConfig,
    rng: torch.Generator,
    reference: TwoStagePolicy | None = None,
    ranks: Ranks = SINGLE,
) -> StepStats:
    """`cfg.requests_per_step` requests, a group of `cfg.group_size` plans each (advantages normalised
    within each group), then `cfg.epochs` clipped updates on all of them together.

    Without a KL or entropy term a batch whose groups all have equal rewards is skipped rather than
    stepped: its gradient is zero, and an Adam step would only replay momentum from earlier batches.
    """
    if cfg.kl_coef and reference is None:
        raise ValueError("cfg.kl_coef > 0 needs a reference policy")
    n = cfg.group_size
    requests = [env.sample_request(rng, sample_budget(cfg.budget_range_ms, rng)) for _ in range(cfg.requests_per_step)]
    rollouts = policy.sample_groups(requests, n, rng)
    results = run_rollouts(env, requests, rollouts, ranks)
    rewards = torch.tensor(
        [[reward(s, lat, r.budget_ms, cfg.penalty) for s, lat in group] for r, group in zip(requests, results)]
    )
    budget, question, features = (torch.cat(parts) for parts in zip(*(policy.request_batch(r, n) for r in requests)))
    hidden, logp_old, entropy = (
        torch.cat(parts) for parts in zip(*((ro.hidden, ro.log_prob, ro.entropy) for ro in rollouts))
    )
    inputs = ([plan for ro in rollouts for plan in ro.plans], budget, question, features, hidden)
    advantages = group_advantages(rewards, cfg.scale_advantages).flatten().to(logp_old.device)
    with torch.no_grad():
        logp_ref = reference.log_prob(*inputs) if reference is not None else None
    updated = bool(advantages.any()) or cfg.kl_coef > 0 or cfg.entropy_coef > 0
    stats = None
    share = ranks.shard(range(len(advantages)))  # this rank's samples of the loss (all of them for one rank)
    mine = torch.tensor(share, device=logp_old.device)
    my_inputs = ([inputs[0][i] for i in share], *(x[mine.to(x.device)] for x in inputs[1:]))
    my_ref = None if logp_ref is None else logp_ref[mine]
    weight = len(share) / len(advantages)  # losses are means: the ranks' weighted ones sum to the batch's
    for _ in range(cfg.epochs if updated else 0):
        logp_new, entropy_new = policy.evaluate(*my_inputs)
        loss, stats = clipped_pg_loss(logp_new, logp_old[mine], advantages[mine], cfg.clip_eps, cfg.kl_coef, my_ref)
        loss = loss - cfg.entropy_coef * entropy_new.mean()
        optimizer.zero_grad()
        (loss * weight).backward()
        ranks.sum_grads(list(policy.parameters()))
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
    if stats is not None and ranks.world > 1:
        stats = LossStats(*ranks.sum(torch.tensor(astuple(stats), dtype=torch.float64) * weight).tolist())
    for model in (policy, reference) if reference is not None else (policy,):
        model.observe(question[::n], features[::n], hidden)
    runs = [(s, lat, r.budget_ms) for r, group in zip(requests, results) for s, lat in group]
    return StepStats(
        reward_mean=rewards.mean().item(),
        score_mean=sum(s for s, _, _ in runs) / len(runs),
        latency_mean_ms=sum(lat for _, lat, _ in runs) / len(runs),
        violation_rate=sum(lat > b for _, lat, b in runs) / len(runs),
        entropy=entropy.mean().item(),
        updated=updated,
        loss=stats,
    )


def run_rollouts(
    env: Environment, requests: Sequence[PolicyRequest], rollouts: Sequence[Rollout], ranks: Ranks = SINGLE
) -> list[list[tuple[float, float]]]:
    """(score, latency) of every sampled plan, request by request: each rank runs its share of the plans
    (every `world`-th one) and every rank gets all the results."""
    pairs = [(i, j) for i, rollout in enumerate(rollouts) for j in range(len(rollout.plans))]
    mine = {(i, j): env.run(requests[i], rollouts[i].plans[j]) for i, j in ranks.shard(pairs)}
    done = {key: result for part in ranks.gather(mine) for key, result in part.items()}
    return [[done[(i, j)] for j in range(len(rollout.plans))] for i, rollout in enumerate(rollouts)]


class GRPORun:
    """A resumable GRPO run of `steps` steps: the policy, its optimizer and linearly decaying lr (with
    `cfg.lr_decay`), the frozen reference for the KL term (with `cfg.kl_coef`), the rng and the step.

    The greedy plan is the policy's mode, which flips across budget boundaries for as long as the policy
    keeps moving: the decay to 0 at the last step settles it. The reference is a frozen copy of the
    starting weights; its input statistics take in the same requests as the policy's, so the KL term
    measures the weights' drift only. `state_dict` / `load_state_dict` carry all of it across restarts.
    """

    def __init__(
        self, policy: TwoStagePolicy, env: Environment, cfg: GRPOConfig, steps: int, ranks: Ranks = SINGLE
    ) -> None:
        if tuple(policy.budget_range_ms) != tuple(map(float, cfg.budget_range_ms)):
            raise ValueError(
                f"the policy's budget range {policy.budget_range_ms} must be the training range {cfg.budget_range_ms}"
            )
        self.policy, self.env, self.cfg, self.steps, self.ranks = policy, env, cfg, steps, ranks
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.optimizer = make_optimizer(policy, cfg)
        decay = (lambda step: 1.0 - step / steps) if cfg.lr_decay else (lambda step: 1.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        self.reference = copy.deepcopy(policy).requires_grad_(False) if cfg.kl_coef else None
        self.step = 0

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def advance(self) -> StepStats:
        stats = grpo_step(self.policy, self.optimizer, self.env, self.cfg, self.rng, self.reference, self.ranks)
        self.schedule.step()
        self.step += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "reference": None if self.reference is None else self.reference.state_dict(),
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])


def train(
    policy: TwoStagePolicy,
    env: Environment,
    cfg: GRPOConfig,
    steps: int,
    on_step: Callable[[int, StepStats], None] | None = None,
    ranks: Ranks = SINGLE,
) -> list[StepStats]:
    """`steps` GRPO steps in one go (see `GRPORun`), seeded by `cfg.seed`; the initial weights are the caller's."""
    run = GRPORun(policy, env, cfg, steps, ranks)
    history = []
    while not run.done:
        stats = run.advance()
        history.append(stats)
        if on_step is not None:
            on_step(run.step - 1, stats)
    return history
