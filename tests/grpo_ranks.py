"""Run by test_ranks under `accelerate launch`: GRPO on test_grpo's synthetic environment (deterministic scores
and latencies), every rank counting the rollouts it ran; rank 0 saves the trained weights.

    python grpo_ranks.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_grpo import BUDGETS, SyntheticEnv, make_policy

from lmms_adaptive.serving.ranks import init
from lmms_adaptive.tools.grpo import GRPOConfig, train

CONFIG = GRPOConfig(group_size=4, requests_per_step=3, budget_range_ms=BUDGETS, seed=0)
STEPS = 3


class CountingEnv(SyntheticEnv):
    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def run(self, request, plan):
        self.runs += 1
        return super().run(request, plan)


def trained(ranks=None) -> tuple[torch.nn.Module, int]:
    """The policy after `STEPS` steps of `CONFIG`, and how many rollouts this process ran."""
    torch.set_num_threads(1)
    policy, env = make_policy(seed=0), CountingEnv()
    train(policy, env, CONFIG, STEPS, **({} if ranks is None else {"ranks": ranks}))
    return policy, env.runs


def main(out: Path) -> None:
    ranks = init()
    policy, runs = trained(ranks)
    (out / f"runs.rank{ranks.rank}.json").write_text(json.dumps(runs))
    if ranks.main:
        torch.save(policy.state_dict(), out / "policy.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
