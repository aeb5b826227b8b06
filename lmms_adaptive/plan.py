"""The per-request plan (the four knobs) and the knob space a model allows.

A controller returns a `Plan`; `KnobSpace.schedule(plan)` is the one place a plan becomes the decoder's
`LayerSchedule` (which blocks run and with which top-k). `max_crops` goes to the processor.

Knob semantics (MolmoE-1B values, derived from the config for other sizes):
- tier / max_crops: low / medium / high = max_crops // 4, // 2, max_crops (3 / 6 / 12);
- insertion position p in 1..L//4+1 (1..5): the first p blocks always run, at the model's own top-k;
- top-k for every block after p: ceil(k/2)..k (4..8);
- active blocks: totals from max(L - L//4, p + L - L//4 - 1) to L (p=1: 12..16, p=3: 14..16, p=5: 16);
  the blocks dropped are the least important ones after p, per `drop_order`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import Tensor

from .config import MolmoeConfig
from .model import LayerSchedule

TIER_NAMES = ("low", "medium", "high")


@dataclass(frozen=True)
class Plan:
    max_crops: int
    top_k: int
    n_blocks: int
    insert_pos: int = 1
    renormalize: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class DeferredPlan:
    """Stage 1's decision, with top-k and active blocks left to stage 2 at block `insert_pos`.

    The runtime runs blocks 0..insert_pos-1 over the prompt with `latency_token` (an embedding [d_model])
    appended at the next position (a probe nothing attends to), and calls `stage2` with its hidden state
    there; the plan it returns must keep this tier, insertion position and renormalisation."""

    max_crops: int
    insert_pos: int
    latency_token: Tensor
    stage2: Callable[[Tensor], Plan]
    renormalize: bool = False

    def complete(self, hidden: Tensor) -> Plan:
        plan = self.stage2(hidden)
        decided = (plan.max_crops, plan.insert_pos, plan.renormalize)
        if decided != (self.max_crops, self.insert_pos, self.renormalize):
            raise ValueError(
                f"stage 2 returned {plan}, which changes the stage-1 choices "
                f"(max_crops {self.max_crops}, insert_pos {self.insert_pos}, renormalize {self.renormalize})"
            )
        return plan


@dataclass(frozen=True)
class KnobSpace:
    n_layers: int
    model_top_k: int
    max_crops: int
    tiers: tuple[int, ...]
    top_k_options: tuple[int, ...]
    insert_positions: tuple[int, ...]
    min_blocks: int

    @classmethod
    def from_config(cls, config: MolmoeConfig) -> KnobSpace:
        n, k, crops = config.n_layers, config.moe_top_k, config.max_crops
        droppable = n // 4
        tiers = tuple(sorted({max(1, crops // 4), max(1, crops // 2), crops}))
        return cls(
            n_layers=n,
            model_top_k=k,
            max_crops=crops,
            tiers=tiers,
            top_k_options=tuple(range((k + 1) // 2, k + 1)),
            insert_positions=tuple(range(1, droppable + 2)),
            min_blocks=n - droppable,
        )

    def tier(self, name_or_crops: str | int) -> int:
        """'low' / 'medium' / 'high' (or an explicit max_crops) -> max_crops."""
        if isinstance(name_or_crops, str):
            if name_or_crops not in TIER_NAMES[: len(self.tiers)]:
                raise ValueError(
                    f"tier must be one of {', '.join(TIER_NAMES[: len(self.tiers)])}, got {name_or_crops!r}"
                )
            return self.tiers[TIER_NAMES.index(name_or_crops)]
        return name_or_crops

    def block_options(self, insert_pos: int) -> range:
        low = max(self.min_blocks, insert_pos + self.min_blocks - 1)
        return range(low, self.n_layers + 1)

    def full_plan(self, max_crops: int | None = None) -> Plan:
        return Plan(max_crops=max_crops or self.max_crops, top_k=self.model_top_k, n_blocks=self.n_layers)

    def cheapest_plan(self) -> Plan:
        return Plan(max_crops=self.tiers[0], top_k=self.top_k_options[0], n_blocks=self.min_blocks, insert_pos=1)

    def plans(self) -> list[Plan]:
        """Every distinct plan over tiers x top-k x blocks (insertion at 1, which allows every block count)."""
        return [
            Plan(max_crops=c, top_k=k, n_blocks=b)
            for c in self.tiers
            for k in self.top_k_options
            for b in self.block_options(1)
        ]

    def validate(self, plan: Plan) -> None:
        if plan.max_crops < 1:
            raise ValueError(f"plan.max_crops must be >= 1, got {plan.max_crops}")
        if plan.insert_pos not in self.insert_positions:
            raise ValueError(f"plan.insert_pos must be one of {list(self.insert_positions)}, got {plan.insert_pos}")
        if not 1 <= plan.top_k <= self.model_top_k:
            raise ValueError(
                f"plan.top_k must be in 1..{self.model_top_k} (usual options {list(self.top_k_options)}), got {plan.top_k}"
            )
        options = self.block_options(plan.insert_pos)
        if plan.n_blocks not in options:
            raise ValueError(
                f"plan.n_blocks must be in {options.start}..{options.stop - 1} for insert_pos {plan.insert_pos}, got {plan.n_blocks}"
            )

    def head_layers(self, insert_pos: int) -> tuple[tuple[int, int], ...]:
        """What every plan with insertion position p runs first: blocks 0..p-1 at the model's own top-k."""
        if insert_pos not in self.insert_positions:
            raise ValueError(f"insert_pos must be one of {list(self.insert_positions)}, got {insert_pos}")
        return tuple((i, self.model_top_k) for i in range(insert_pos))

    def default_drop_order(self) -> tuple[int, ...]:
        """Without a measured importance ranking: drop the deepest blocks first, but never the last one."""
        return tuple(range(self.n_layers - 2, -1, -1)) + (self.n_layers - 1,)

    def schedule(self, plan: Plan, drop_order: Sequence[int] | None = None) -> LayerSchedule:
        """The decoder schedule for a plan. `drop_order`: block indices, least important first."""
        self.validate(plan)
        order = self.default_drop_order() if drop_order is None else tuple(drop_order)
        if sorted(order) != list(range(self.n_layers)):
            raise ValueError(f"drop_order must be a permutation of 0..{self.n_layers - 1}, got {list(order)}")
        candidates = [i for i in order if i >= plan.insert_pos]
        dropped = set(candidates[: self.n_layers - plan.n_blocks])
        return LayerSchedule(
            tuple(
                (i, self.model_top_k if i < plan.insert_pos else plan.top_k)
                for i in range(self.n_layers)
                if i not in dropped
            ),
            renormalize=plan.renormalize,
        )
