"""The per-request plan (the four knobs), the knob space a model allows, and the facts a controller sees.

The knobs are declared once, as the fields of `Plan` marked `knob`; `KNOBS` lists their names and every
other list of knob names derives from it. `KnobSpace` holds the rules: each knob's options
(`options`), the one plan enumerator (`plans`), and the one place a plan becomes the decoder's
`LayerSchedule` (`schedule`: which blocks run and with which top-k). `max_crops` goes to the processor.

Knob semantics (MolmoE-1B values, derived from the config for other sizes):
- tier / max_crops: low / medium / high = max_crops // 4, // 2, max_crops (3 / 6 / 12);
- insertion position p in 1..L//4+1 (1..5): the first p blocks always run, at the model's own top-k;
- top-k for every block after p: ceil(k/2)..k (4..8);
- active blocks: totals from max(L - L//4, p + L - L//4 - 1) to L (p=1: 12..16, p=3: 14..16, p=5: 16);
  the blocks dropped are the least important ones after p, per `drop_order`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

from torch import Tensor

from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import LayerSchedule

TIER_NAMES = ("low", "medium", "high")


def _knob(doc: str, default: int | None = None):
    return field(metadata={"knob": doc}) if default is None else field(default=default, metadata={"knob": doc})


@dataclass(frozen=True)
class Plan:
    """What one request runs with. The knob fields are the knobs; `renormalize` is an MoE setting."""

    max_crops: int = _knob("vision tier: the processor's crop cap")
    top_k: int = _knob("MoE top-k of every block after insert_pos")
    n_blocks: int = _knob("active decoder blocks")
    insert_pos: int = _knob("block after which stage 2 decides top-k and n_blocks", 1)
    renormalize: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "knob" in f.metadata and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"plan.{f.name} must be an integer, got {value!r}")
            if "knob" not in f.metadata and not isinstance(value, bool):
                raise TypeError(f"plan.{f.name} must be true or false, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """A short name, e.g. `crops12_k8_b16_p1`."""
        return f"crops{self.max_crops}_k{self.top_k}_b{self.n_blocks}_p{self.insert_pos}"


KNOBS: tuple[str, ...] = tuple(f.name for f in fields(Plan) if "knob" in f.metadata)


@dataclass(frozen=True)
class RequestFacts:
    """What a controller may know before the vision encoder runs (all cheap to compute)."""

    budget_ms: float | None
    question: str
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) per image
    prompt_tokens_per_tier: dict[int, int]  # max_crops -> exact prompt length with the images at that tier
    crops_per_tier: dict[int, int]  # max_crops -> ViT crops of all images at that tier (the vision cost)
    text_tokens: int
    max_new_tokens: int
    task: str | None = None
    question_ids: tuple[int, ...] = ()  # the question's token ids under the model's tokenizer

    @property
    def image_pixels(self) -> int:
        return sum(h * w for h, w in self.image_sizes)


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

    def block_choices(self) -> tuple[int, ...]:
        """Every active-block count some insertion position allows."""
        return tuple(sorted(set().union(*(self.block_options(p) for p in self.insert_positions))))

    def options(self, knob: str) -> tuple[int, ...]:
        """The values a knob takes in this space (`n_blocks`: over every insertion position)."""
        table = {
            "max_crops": self.tiers,
            "top_k": self.top_k_options,
            "n_blocks": self.block_choices(),
            "insert_pos": self.insert_positions,
        }
        if knob not in KNOBS:
            raise ValueError(f"unknown knob {knob!r}; the knobs are {', '.join(KNOBS)}")
        return table[knob]

    def full_plan(self, max_crops: int | None = None) -> Plan:
        return Plan(max_crops=max_crops or self.max_crops, top_k=self.model_top_k, n_blocks=self.n_layers)

    def cheapest_plan(self) -> Plan:
        return Plan(max_crops=self.tiers[0], top_k=self.top_k_options[0], n_blocks=self.min_blocks, insert_pos=1)

    def plans(self, grid: Mapping[str, Sequence[int]] | None = None) -> list[Plan]:
        """Every valid plan (tiers x insertion positions x the block counts each allows x top-k), in that
        order, narrowed by `grid` ({knob: allowed values}); a grid value outside the space is an error."""
        grid = dict(grid or {})
        for knob, values in grid.items():
            bad = [v for v in values if v not in self.options(knob)]
            if bad:
                raise ValueError(f"{knob} values {bad} are not in the model's knob space {list(self.options(knob))}")

        def allowed(knob: str, values: Sequence[int]) -> list[int]:
            return [v for v in values if knob not in grid or v in grid[knob]]

        plans = [
            Plan(crops, k, blocks, p)
            for crops in allowed("max_crops", self.tiers)
            for p in allowed("insert_pos", self.insert_positions)
            for blocks in allowed("n_blocks", self.block_options(p))
            for k in allowed("top_k", self.top_k_options)
        ]
        if not plans:
            raise ValueError(f"the grid {grid} leaves no valid plan in the knob space")
        return plans

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

    def expert_work(self, plan: Plan) -> int:
        """The MoE top-k summed over the plan's active blocks (what the experts cost per token)."""
        return sum(k for _, k in self.schedule(plan).layers)
