"""The learned controller's core: GRPO maths, the two-stage policy (budget encoding, masking, artifacts) and
GRPO learning a synthetic environment with a known optimum (pure tensors, no model)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmms_adaptive.controllers.base import ArtifactError, read_artifact
from lmms_adaptive.controllers.grpo import (
    PolicyDims,
    PolicyRequest,
    TwoStagePolicy,
    request_feature_dim,
    request_features,
    sinusoidal_budget,
)
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.plan import KnobSpace, Plan, RequestFacts
from lmms_adaptive.tools.grpo import (
    GRPOConfig,
    GRPORun,
    Penalty,
    clipped_pg_loss,
    group_advantages,
    grpo_step,
    make_optimizer,
    reward,
    train,
)

# Like MolmoE-1B: tiers 3/6/12, top-k 4..8, 16 layers (blocks 12..16), insertion after block 1..5.
REAL_CONFIG = Path(__file__).resolve().parents[1] / "lmms_adaptive" / "resources" / "molmoe_config.json"
KNOBS = KnobSpace.from_config(MolmoeConfig.from_dict(json.loads(REAL_CONFIG.read_text())))
D_MODEL = 16
DIMS = PolicyDims(d_model=D_MODEL, sinusoid_dim=64, encoder_hidden=128, head_hidden=128)
BUDGETS = (80.0, 400.0)


def all_plans(knobs: KnobSpace) -> list[Plan]:
    return [
        Plan(max_crops=c, top_k=k, n_blocks=b, insert_pos=p)
        for c in knobs.tiers
        for k in knobs.top_k_options
        for p in knobs.insert_positions
        for b in knobs.block_options(p)
    ]


def make_policy(seed: int = 0) -> TwoStagePolicy:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TwoStagePolicy(KNOBS, DIMS, BUDGETS)


# --- synthetic environment ------------------------------------------------------------------------
# One image size (crops per tier as MolmoE's max_crops + 1 global crop), a 40-token question.
CROPS = {3: 4, 6: 7, 12: 13}
TOKENS = {tier: 144 * crops + 40 for tier, crops in CROPS.items()}
TIER_GAP = {3: 1.0, 6: 0.4, 12: 0.0}  # accuracy lost by a lower tier on the hardest question


def synthetic_latency_ms(plan: Plan) -> float:
    """Vision cost per crop, prefill cost per token x expert work (the first p blocks at top-k 8)."""
    work = 8 * plan.insert_pos + plan.top_k * (plan.n_blocks - plan.insert_pos)
    return 10.0 + 4.0 * CROPS[plan.max_crops] + TOKENS[plan.max_crops] * work / 1000.0


def synthetic_score(plan: Plan, difficulty: float) -> float:
    """Hard questions need the image detail (tier), easy ones lose more to a small top-k."""
    tier_loss = 0.5 * difficulty * TIER_GAP[plan.max_crops]
    top_k_loss = 0.3 * (1.0 - difficulty) * (8 - plan.top_k) / 4
    return 1.0 - tier_loss - top_k_loss - 0.1 * (16 - plan.n_blocks) / 4


@dataclass(frozen=True, eq=False)
class SyntheticRequest(PolicyRequest):
    difficulty: float


class SyntheticEnv:
    """Difficulty in [0, 1] is visible in the question summary and in the stage-2 hidden state (which also
    depends on the stage-1 choices, as the real one does); score and latency are deterministic."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.q_base, self.q_dir, h_base, self.h_dir = torch.randn(4, D_MODEL, generator=g)
        tier_dirs = dict(zip(KNOBS.tiers, torch.randn(len(KNOBS.tiers), D_MODEL, generator=g)))
        pos_dirs = dict(zip(KNOBS.insert_positions, torch.randn(len(KNOBS.insert_positions), D_MODEL, generator=g)))
        self.h_base = {
            (t, p): h_base + 0.3 * tier_dirs[t] + 0.3 * pos_dirs[p] for t in KNOBS.tiers for p in KNOBS.insert_positions
        }
        facts = RequestFacts(
            budget_ms=None,
            question="q",
            image_sizes=((336, 336),),
            prompt_tokens_per_tier=dict(TOKENS),
            crops_per_tier=dict(CROPS),
            text_tokens=40,
            max_new_tokens=16,
        )
        self.features = request_features(facts, KNOBS)

    def make(self, budget_ms: float, difficulty: float) -> SyntheticRequest:
        def hidden(max_crops: int, insert_pos: int, token: torch.Tensor) -> torch.Tensor:
            return self.h_base[(max_crops, insert_pos)] + difficulty * self.h_dir

        question = self.q_base + difficulty * self.q_dir
        return SyntheticRequest(budget_ms, question, self.features, hidden, difficulty)

    def sample_request(self, rng: torch.Generator, budget_ms: float) -> SyntheticRequest:
        return self.make(budget_ms, torch.rand((), generator=rng).item())

    def run(self, request: SyntheticRequest, plan: Plan) -> tuple[float, float]:
        return synthetic_score(plan, request.difficulty), synthetic_latency_ms(plan)


# --- reward and advantages ------------------------------------------------------------------------
def test_reward_is_the_score_within_budget_and_penalised_beyond() -> None:
    penalty = Penalty(constant=1.0, per_overshoot=2.0, latency_cost=0.0)
    assert reward(0.7, 100.0, 100.0, penalty) == 0.7  # equal is within budget
    assert reward(0.7, 50.0, 100.0, penalty) == 0.7
    assert reward(0.7, 110.0, 100.0, penalty) == pytest.approx(0.7 - 1.0 - 2.0 * 0.1)
    assert reward(1.0, 100.1, 100.0) < reward(0.0, 100.0, 100.0)  # any violation is worse than any fit
    assert reward(0.7, 900.0, 100.0, penalty) == pytest.approx(0.7 - 1.0 - 2.0 * 1.0)  # overshoot capped at 1
    assert reward(0.7, 900.0, 100.0, Penalty(cap=10.0, latency_cost=0.0)) == pytest.approx(0.7 - 1.0 - 8.0)


def test_latency_within_budget_costs_in_proportion_to_the_budget_used() -> None:
    cost = Penalty(latency_cost=0.1)
    assert reward(0.7, 50.0, 100.0, cost) == pytest.approx(0.7 - 0.05)
    assert reward(0.7, 100.0, 100.0, cost) == pytest.approx(0.7 - 0.1)
    assert reward(0.7, 110.0, 100.0, cost) == pytest.approx(0.7 - 0.1 - 1.0 - 0.1)  # cost stops at the budget
    assert reward(0.7, 20.0, 100.0) > reward(0.7, 80.0, 100.0)  # on by default: same score, cheaper wins
    assert reward(0.75, 80.0, 100.0) > reward(0.7, 20.0, 100.0)  # but a full budget costs less than 0.05


def test_group_advantages_hand_values() -> None:
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(1.25)  # population std of 1..4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-6)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 2.0])), torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)


def test_centred_advantages_keep_the_reward_spread() -> None:
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), scale=False),
                               torch.tensor([-1.5, -0.5, 0.5, 1.5]))  # fmt: skip
    assert torch.equal(group_advantages(torch.full((4,), 0.3), scale=False), torch.zeros(4))


def test_equal_rewards_give_exactly_zero_advantages() -> None:
    assert torch.equal(group_advantages(torch.full((8,), 0.1)), torch.zeros(8))
    batched = group_advantages(torch.tensor([[0.3, 0.3, 0.3], [0.0, 1.0, 2.0]]))
    assert torch.equal(batched[0], torch.zeros(3))
    assert batched[1].abs().sum() > 0


# --- clipped loss -------------------------------------------------------------------------------------
def test_clipped_loss_hand_values() -> None:
    logp_old = torch.zeros(3)
    logp_new = torch.log(torch.tensor([1.1, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = clipped_pg_loss(logp_new, logp_old, adv, clip_eps=0.2)
    # min(1.1, 1.1) = 1.1; min(1.5, 1.2) = 1.2; min(-0.5, -0.8) = -0.8
    assert loss.item() == pytest.approx(-(1.1 + 1.2 - 0.8) / 3)
    assert stats.clip_frac == pytest.approx(2 / 3)
    assert stats.ratio_mean == pytest.approx((1.1 + 1.5 + 0.5) / 3)
    assert stats.kl == 0.0


@pytest.mark.parametrize("advantage", [1.0, -1.0])
@pytest.mark.parametrize("ratio", [0.7, 0.79, 0.81, 1.0, 1.19, 1.21, 1.5])
def test_clipping_engages_exactly_beyond_one_plus_minus_eps(advantage: float, ratio: float) -> None:
    eps = 0.2
    logp_new = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, _ = clipped_pg_loss(logp_new, torch.zeros(1), torch.tensor([advantage]), clip_eps=eps)
    loss.backward()
    # A positive advantage stops pushing once the ratio is above 1 + eps, a negative one once below 1 - eps;
    # on the other side the unclipped term keeps its gradient (-A * ratio).
    clipped = ratio > 1 + eps if advantage > 0 else ratio < 1 - eps
    if clipped:
        assert logp_new.grad.item() == 0.0
    else:
        assert logp_new.grad.item() == pytest.approx(-advantage * ratio)


def test_kl_term_is_zero_for_equal_policies_and_positive_otherwise() -> None:
    logp = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    adv = torch.tensor([1.0, -1.0, 0.0])
    loss0, _ = clipped_pg_loss(logp, logp, adv, 0.2)
    loss, stats = clipped_pg_loss(logp, logp, adv, 0.2, kl_coef=0.5, logp_ref=logp)
    assert stats.kl == 0.0 and loss.item() == pytest.approx(loss0.item())
    ref = torch.log(torch.tensor([0.4, 0.4, 0.2]))
    loss, stats = clipped_pg_loss(logp, logp, adv, 0.2, kl_coef=0.5, logp_ref=ref)
    d = ref - logp
    k3 = (torch.exp(d) - d - 1).mean().item()
    assert stats.kl == pytest.approx(k3) and k3 > 0
    assert loss.item() == pytest.approx(loss0.item() + 0.5 * k3)
    with pytest.raises(ValueError, match="logp_ref"):
        clipped_pg_loss(logp, logp, adv, 0.2, kl_coef=0.5)


def test_equal_rewards_give_zero_gradient_and_no_update() -> None:
    policy, env = make_policy(), SyntheticEnv()
    request = env.make(200.0, 0.5)
    rollout = policy.sample(request, 8, torch.Generator().manual_seed(0))
    inputs = (rollout.plans, *policy.request_batch(request, 8), rollout.hidden)
    logp = policy.log_prob(*inputs)
    loss, _ = clipped_pg_loss(logp, logp.detach(), group_advantages(torch.full((8,), 0.4)), 0.2)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())

    class Flat(SyntheticEnv):
        def run(self, request: SyntheticRequest, plan: Plan) -> tuple[float, float]:
            return 1.0, 1.0

    cfg = GRPOConfig(group_size=4, requests_per_step=2, entropy_coef=0.0, budget_range_ms=BUDGETS)
    before = [p.detach().clone() for p in policy.parameters()]
    stats = grpo_step(policy, make_optimizer(policy, cfg), Flat(), cfg, torch.Generator().manual_seed(0))
    assert not stats.updated and stats.loss is None
    assert all(torch.equal(b, p) for b, p in zip(before, policy.parameters()))


# --- policy ---------------------------------------------------------------------------------------------
def test_sinusoidal_budget_is_deterministic_and_distinct() -> None:
    budgets = torch.tensor([10.0, 100.0, 101.0, 200.0, 10_000.0])
    enc = sinusoidal_budget(budgets, 256)
    assert enc.shape == (5, 256) and enc.dtype == torch.float32
    assert torch.equal(enc, sinusoidal_budget(budgets.clone(), 256))
    distances = torch.cdist(enc, enc) + torch.eye(5) * 1e9
    assert distances.min() > 0.5  # even 100 vs 101 ms are clearly apart
    with pytest.raises(ValueError, match="even"):
        sinusoidal_budget(budgets, 255)


def test_request_features() -> None:
    facts = RequestFacts(
        budget_ms=200.0,
        question="q",
        image_sizes=((10, 10),),
        prompt_tokens_per_tier={3: 99, 6: 199, 12: 399},
        crops_per_tier={3: 4, 6: 7, 12: 13},
        text_tokens=19,
        max_new_tokens=63,
    )
    features = request_features(facts, KNOBS)
    assert features.shape == (request_feature_dim(KNOBS),)
    torch.testing.assert_close(features, torch.log1p(torch.tensor([99.0, 199, 399, 4, 7, 13, 19, 63])))
    with pytest.raises(ValueError, match="tiers"):
        request_features(RequestFacts(**{**facts.__dict__, "crops_per_tier": {3: 4}}), KNOBS)


def test_stage2_never_samples_an_invalid_block_count() -> None:
    policy = make_policy()
    g = torch.Generator().manual_seed(0)
    n = 400
    for pos in KNOBS.insert_positions:
        hidden = torch.randn(n, D_MODEL, generator=g)
        dist = policy.stage2_dist(
            torch.full((n,), 150.0),
            hidden,
            torch.zeros(n, request_feature_dim(KNOBS)),
            torch.full((n,), 6),
            torch.full((n,), pos),
        )
        _, blocks = dist.sample(g)
        counts = {policy.block_choices[b] for b in blocks.tolist()}
        assert counts <= set(KNOBS.block_options(pos))
        invalid = torch.tensor([b not in KNOBS.block_options(pos) for b in policy.block_choices])
        assert torch.all(dist.joint[:, :, invalid] == float("-inf"))


def test_log_prob_is_a_distribution_over_valid_plans_and_minus_inf_otherwise() -> None:
    policy, env = make_policy(), SyntheticEnv()
    request = env.make(150.0, 0.3)
    plans = all_plans(KNOBS)
    budget, question, features = policy.request_batch(request, len(plans))
    hidden = torch.randn(1, D_MODEL).expand(len(plans), -1)  # one stage-2 input for every stage-1 choice
    with torch.no_grad():
        logp = policy.log_prob(plans, budget, question, features, hidden)
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    invalid = [
        Plan(max_crops=6, top_k=8, n_blocks=12, insert_pos=5),  # blocks not allowed after block 5
        Plan(max_crops=6, top_k=8, n_blocks=13, insert_pos=3),
        Plan(max_crops=7, top_k=8, n_blocks=16),  # not a tier of the knob space
        Plan(max_crops=6, top_k=3, n_blocks=16),
        Plan(max_crops=6, top_k=8, n_blocks=11),
    ]
    with torch.no_grad():
        logp = policy.log_prob(invalid, *(x[: len(invalid)] for x in (budget, question, features, hidden)))
    assert torch.all(logp == float("-inf"))


def test_knob_pair_reads_as_marginal_and_conditional() -> None:
    policy, env = make_policy(), SyntheticEnv()
    budget, question, features = policy.request_batch(env.make(120.0, 0.6), 1)
    with torch.no_grad():
        stage1 = policy.stage1_dist(budget, question, features)
    tier, pos = torch.tensor([2]), torch.tensor([3])
    assert stage1.first.logits.exp().sum().item() == pytest.approx(1.0)
    assert stage1.second(tier).logits.exp().sum().item() == pytest.approx(1.0)
    split = stage1.first.log_prob(tier) + stage1.second(tier).log_prob(pos)
    torch.testing.assert_close(split, stage1.log_prob(tier, pos))
    assert stage1.mode() == tuple(torch.tensor([i]) for i in divmod(int(stage1.joint.argmax()), 5))


def test_greedy_and_samples_are_valid_plans() -> None:
    policy, env = make_policy(), SyntheticEnv()
    g = torch.Generator().manual_seed(0)
    for budget in (80.0, 150.0, 400.0):
        request = env.make(budget, 0.5)
        KNOBS.validate(policy.greedy(request))
        for plan in policy.sample(request, 64, g).plans:
            KNOBS.validate(plan)
        assert policy.greedy(request) == policy.greedy(request)


def test_budget_outside_trained_range_is_clamped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    policy = make_policy()
    with caplog.at_level(logging.WARNING, logger="lmms_adaptive.controllers.grpo"):
        low = policy.latency_token(torch.tensor([10.0]))
        high = policy.latency_token(torch.tensor([5000.0, 400.0]))
        policy.latency_token(torch.tensor([20.0]))
    assert len(caplog.records) == 1 and "clamping" in caplog.records[0].getMessage()
    assert torch.equal(low, policy.latency_token(torch.tensor([80.0])))
    assert torch.equal(high[0], high[1])


# --- artifacts --------------------------------------------------------------------------------------------
def test_artifact_round_trip_and_refusal_for_another_model(tmp_path) -> None:
    policy, env = make_policy(), SyntheticEnv()
    cfg = GRPOConfig(group_size=4, requests_per_step=2, budget_range_ms=BUDGETS)
    train(policy, env, cfg, steps=3)  # non-trivial input statistics and moved weights
    artifact = policy.to_artifact("fp-model-a", device="cpu", training={"steps": 3})
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(artifact))

    loaded = TwoStagePolicy.from_artifact(read_artifact(path, "fp-model-a", KNOBS), KNOBS)
    assert loaded.budget_range_ms == BUDGETS and loaded.dims == DIMS
    assert set(loaded.state_dict()) == set(policy.state_dict())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in policy.state_dict().items())
    plans = all_plans(KNOBS)
    request = env.make(170.0, 0.8)
    inputs = (plans, *policy.request_batch(request, len(plans)), torch.randn(len(plans), D_MODEL))
    with torch.no_grad():
        assert torch.equal(policy.log_prob(*inputs), loaded.log_prob(*inputs))
    assert policy.greedy(request) == loaded.greedy(request)

    with pytest.raises(ArtifactError, match="made for model"):
        read_artifact(path, "fp-model-b", KNOBS)
    other_knobs = KnobSpace(**{**KNOBS.__dict__, "tiers": (3, 12)})
    with pytest.raises(ArtifactError, match="knob space"):
        TwoStagePolicy.from_artifact(artifact, other_knobs)
    with pytest.raises(ArtifactError, match="kind"):
        TwoStagePolicy.from_artifact({**artifact, "kind": "static"}, KNOBS)


# --- learning -----------------------------------------------------------------------------------------------
LEARN_CFG = GRPOConfig(
    group_size=16,
    requests_per_step=16,
    lr=2e-3,
    stage1_lr_scale=0.1,
    entropy_coef=0.01,
    epochs=2,
    budget_range_ms=BUDGETS,
    seed=0,
)
LEARN_STEPS = 300


@pytest.fixture(scope="module")
def trained() -> tuple[TwoStagePolicy, SyntheticEnv, float]:
    policy, env = make_policy(), SyntheticEnv()
    start = time.perf_counter()
    train(policy, env, LEARN_CFG, LEARN_STEPS)
    return policy, env, time.perf_counter() - start


def test_grpo_reaches_the_brute_force_optimum_within_budgets(trained) -> None:
    policy, env, seconds = trained
    plans = all_plans(KNOBS)
    got = best = 0.0
    violations = cases = 0
    budgets = torch.logspace(math.log10(BUDGETS[0]), math.log10(BUDGETS[1]), 30, dtype=torch.float64).tolist()
    for budget in budgets:
        for difficulty in (0.05, 0.3, 0.5, 0.7, 0.95):
            request = env.make(budget, difficulty)
            assert any(synthetic_latency_ms(p) <= budget for p in plans)  # a fitting plan exists
            plan = policy.greedy(request)
            score, latency = env.run(request, plan)
            got += reward(score, latency, budget, LEARN_CFG.penalty)
            best += max(reward(*env.run(request, p), budget, LEARN_CFG.penalty) for p in plans)
            violations += latency > budget
            cases += 1
    print(
        f"GRPO synthetic: {LEARN_STEPS} steps in {seconds:.1f} s, greedy reward {got / best:.3f} of optimal, "
        f"violations {violations}/{cases}"
    )
    assert got / best >= 0.95
    assert violations / cases <= 0.02


def test_grpo_training_is_deterministic() -> None:
    env = SyntheticEnv()
    cfg = GRPOConfig(group_size=8, requests_per_step=4, budget_range_ms=BUDGETS, seed=3)
    runs = []
    for _ in range(2):
        policy = make_policy(seed=1)
        history = train(policy, env, cfg, steps=5)
        runs.append((policy.state_dict(), [s.reward_mean for s in history]))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(v, runs[1][0][k]) for k, v in runs[0][0].items())


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """GRPORun's state (policy, optimizer, lr schedule, KL reference, rng) survives a save/load through a file."""
    env = SyntheticEnv()
    cfg = GRPOConfig(group_size=4, requests_per_step=2, kl_coef=0.05, budget_range_ms=BUDGETS, seed=5)
    straight = make_policy(seed=2)
    train(straight, env, cfg, steps=6)
    first = GRPORun(make_policy(seed=2), env, cfg, steps=6)
    for _ in range(3):
        first.advance()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = GRPORun(make_policy(seed=9), env, cfg, steps=6)  # other initial weights: all comes from the state
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    while not resumed.done:
        resumed.advance()
    assert resumed.step == 6
    assert all(torch.equal(v, resumed.policy.state_dict()[k]) for k, v in straight.state_dict().items())


def test_kl_term_in_training() -> None:
    cfg = GRPOConfig(group_size=4, requests_per_step=2, kl_coef=0.1, budget_range_ms=BUDGETS)
    history = train(make_policy(), SyntheticEnv(), cfg, steps=3)
    kls = [s.loss.kl for s in history]
    assert all(kl >= 0 for kl in kls) and kls[-1] > 0


def test_train_refuses_a_budget_range_other_than_the_policys() -> None:
    cfg = GRPOConfig(budget_range_ms=(50.0, 500.0))
    with pytest.raises(ValueError, match="budget range"):
        train(make_policy(), SyntheticEnv(), cfg, steps=1)


# --- a question type -> tier optimum that only the latency cost decides ----------------------------------------
TYPE_SCORE = {0.0: {3: 1.0, 6: 1.0, 12: 1.0}, 1.0: {3: 0.2, 6: 0.5, 12: 1.0}}  # colour needs no detail; detail does


class TypedEnv(SyntheticEnv):
    """Two question types, colour (difficulty 0) and detail (1), visible as in `SyntheticEnv`; the score
    depends on the tier only, so top-k and blocks buy nothing and colour gains nothing from crops: only the
    within-budget latency cost tells the policy to spend less where more buys no score."""

    def sample_request(self, rng: torch.Generator, budget_ms: float) -> SyntheticRequest:
        return self.make(budget_ms, float(torch.rand((), generator=rng).item() < 0.5))

    def run(self, request: SyntheticRequest, plan: Plan) -> tuple[float, float]:
        return TYPE_SCORE[request.difficulty][plan.max_crops], synthetic_latency_ms(plan)


def test_grpo_with_a_latency_cost_learns_the_tier_each_question_type_needs() -> None:
    cheapest_12_crops = min(synthetic_latency_ms(p) for p in all_plans(KNOBS) if p.max_crops == 12)
    policy, env = make_policy(), TypedEnv()
    train(policy, env, LEARN_CFG, steps=120)
    budgets = torch.logspace(math.log10(BUDGETS[0]), math.log10(BUDGETS[1]), 12, dtype=torch.float64).tolist()
    colour = [policy.greedy(env.make(b, 0.0)) for b in budgets]
    detail = [policy.greedy(env.make(b, 1.0)) for b in budgets if b >= 1.2 * cheapest_12_crops]
    assert all(p.max_crops == 3 for p in colour), colour
    assert all(p.max_crops == 12 for p in detail), detail
    assert all(synthetic_latency_ms(p) <= b for p, b in zip(colour, budgets))
    cheapest = min(synthetic_latency_ms(p) for p in all_plans(KNOBS) if p.max_crops == 3)
    assert sum(synthetic_latency_ms(p) for p in colour) / len(colour) <= 1.5 * cheapest  # spends little on colour
