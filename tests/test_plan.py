"""The per-request Plan and the KnobSpace that turns it into a decoder LayerSchedule (pure, no model)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

import lmms_adaptive
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import LayerSchedule
from lmms_adaptive.core.plan import KNOBS, KnobSpace, Plan
from lmms_adaptive.default.tiny import tiny_config

# The packaged copy of the official MolmoE-1B-0924 config.json (checked against the shared one below).
PACKAGED_CONFIG = Path(lmms_adaptive.__file__).parent / "resources" / "molmoe_config.json"


@pytest.fixture(scope="module")
def config() -> MolmoeConfig:
    return MolmoeConfig.from_dict(json.loads(PACKAGED_CONFIG.read_text()), str(PACKAGED_CONFIG))


@pytest.fixture(scope="module")
def space(config: MolmoeConfig) -> KnobSpace:
    return KnobSpace.from_config(config)


def all_valid_plans(space: KnobSpace) -> list[Plan]:
    return [
        Plan(max_crops=c, top_k=k, n_blocks=b, insert_pos=p)
        for c in space.tiers
        for k in space.top_k_options
        for p in space.insert_positions
        for b in space.block_options(p)
    ]


def test_packaged_config_is_the_real_one(real_checkpoint_dir: Path) -> None:
    assert json.loads(PACKAGED_CONFIG.read_text()) == json.loads((real_checkpoint_dir / "config.json").read_text())
    assert KnobSpace.from_config(MolmoeConfig.from_folder(real_checkpoint_dir)) == KnobSpace.from_config(
        MolmoeConfig.from_dict(json.loads(PACKAGED_CONFIG.read_text()))
    )


def test_molmoe_1b_space(space: KnobSpace) -> None:
    assert (space.n_layers, space.model_top_k, space.max_crops) == (16, 8, 12)
    assert space.tiers == (3, 6, 12)
    assert space.top_k_options == (4, 5, 6, 7, 8)
    assert space.insert_positions == (1, 2, 3, 4, 5)
    assert list(space.block_options(1)) == [12, 13, 14, 15, 16]
    assert list(space.block_options(2)) == [13, 14, 15, 16]
    assert list(space.block_options(3)) == [14, 15, 16]
    assert list(space.block_options(4)) == [15, 16]
    assert list(space.block_options(5)) == [16]
    assert [space.tier(name) for name in ("low", "medium", "high")] == [3, 6, 12]
    assert space.tier(7) == 7
    with pytest.raises(ValueError, match="tier"):
        space.tier("ultra")


def test_tiny_space_keeps_molmoe_shape() -> None:
    space = KnobSpace.from_config(MolmoeConfig.from_dict(tiny_config(1000)))
    assert space.tiers == (3, 6, 12)
    assert space.top_k_options == (4, 5, 6, 7, 8)
    assert space.insert_positions == (1, 2, 3)
    assert list(space.block_options(1)) == [6, 7, 8]
    assert list(space.block_options(3)) == [8]


def test_full_and_cheapest_plans(space: KnobSpace, config: MolmoeConfig) -> None:
    full = space.full_plan()
    assert full == Plan(max_crops=12, top_k=8, n_blocks=16, insert_pos=1, renormalize=False)
    assert space.full_plan(3).max_crops == 3
    assert space.schedule(full) == LayerSchedule.full(config)
    assert space.cheapest_plan() == Plan(max_crops=3, top_k=4, n_blocks=12, insert_pos=1)
    space.validate(space.cheapest_plan())


def test_full_depth_and_full_k_is_the_unmodified_model_for_every_insert_pos(
    space: KnobSpace, config: MolmoeConfig
) -> None:
    for p in space.insert_positions:
        assert space.schedule(Plan(max_crops=6, top_k=8, n_blocks=16, insert_pos=p)) == LayerSchedule.full(config)


@pytest.mark.parametrize("order_kind", ["default", "identity", "reversed", "random"])
def test_schedule_semantics_for_every_plan(space: KnobSpace, order_kind: str) -> None:
    n = space.n_layers
    order = {
        "default": None,
        "identity": list(range(n)),  # would drop the earliest blocks first: insert_pos must protect them
        "reversed": list(range(n - 1, -1, -1)),
        "random": random.Random(1234).sample(range(n), n),
    }[order_kind]
    effective = space.default_drop_order() if order is None else tuple(order)
    for plan in all_valid_plans(space):
        for renormalize in (False, True):
            plan_r = Plan(plan.max_crops, plan.top_k, plan.n_blocks, plan.insert_pos, renormalize)
            schedule = space.schedule(plan_r, order)
            blocks = schedule.blocks
            assert len(blocks) == plan.n_blocks
            assert list(blocks) == sorted(set(blocks)), "blocks run once each, in depth order"
            assert set(range(plan.insert_pos)) <= set(blocks), "never drop a block before the insertion point"
            for i, k in schedule.layers:
                assert k == (space.model_top_k if i < plan.insert_pos else plan.top_k)
            # The dropped blocks are exactly the least important ones (per drop_order) after insert_pos.
            candidates = [i for i in effective if i >= plan.insert_pos]
            assert set(range(n)) - set(blocks) == set(candidates[: n - plan.n_blocks])
            assert schedule.renormalize is renormalize


def test_default_drop_order_drops_deepest_but_never_the_last_block(space: KnobSpace) -> None:
    order = space.default_drop_order()
    assert sorted(order) == list(range(16))
    assert order[-1] == 15
    schedule = space.schedule(Plan(max_crops=3, top_k=4, n_blocks=12))
    assert schedule.blocks == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15)
    assert schedule.layers[0] == (0, 8)
    assert all(k == 4 for _, k in schedule.layers[1:])


def test_explicit_drop_order_is_respected(space: KnobSpace) -> None:
    order = [3, 0, 9, 1, 12, 15, 2, 4, 5, 6, 7, 8, 10, 11, 13, 14]
    assert space.schedule(Plan(3, 6, 14, insert_pos=1), order).blocks == tuple(i for i in range(16) if i not in (3, 9))
    # insert_pos 2 protects block 1: the next candidates (9, 12) go instead
    assert space.schedule(Plan(3, 6, 13, insert_pos=2), order).blocks == tuple(
        i for i in range(16) if i not in (3, 9, 12)
    )
    assert space.schedule(Plan(3, 6, 16, insert_pos=5), order) == LayerSchedule(
        tuple((i, 8 if i < 5 else 6) for i in range(16))
    )


@pytest.mark.parametrize(
    ("plan", "knob"),
    [
        (Plan(max_crops=0, top_k=8, n_blocks=16), "max_crops"),
        (Plan(max_crops=6, top_k=0, n_blocks=16), "top_k"),
        (Plan(max_crops=6, top_k=9, n_blocks=16), "top_k"),
        (Plan(max_crops=6, top_k=8, n_blocks=16, insert_pos=0), "insert_pos"),
        (Plan(max_crops=6, top_k=8, n_blocks=16, insert_pos=6), "insert_pos"),
        (Plan(max_crops=6, top_k=8, n_blocks=11), "n_blocks"),
        (Plan(max_crops=6, top_k=8, n_blocks=17), "n_blocks"),
        (Plan(max_crops=6, top_k=8, n_blocks=15, insert_pos=5), "n_blocks"),
        (Plan(max_crops=6, top_k=8, n_blocks=13, insert_pos=3), "n_blocks"),
    ],
)
def test_invalid_plans_raise_naming_the_knob(space: KnobSpace, plan: Plan, knob: str) -> None:
    with pytest.raises(ValueError, match=rf"plan\.{knob}"):
        space.validate(plan)
    with pytest.raises(ValueError, match=rf"plan\.{knob}"):
        space.schedule(plan)


@pytest.mark.parametrize("order", [list(range(15)), list(range(15)) + [0], list(range(1, 17)), [*range(15), 15, 3]])
def test_bad_drop_order_raises(space: KnobSpace, order: list[int]) -> None:
    with pytest.raises(ValueError, match="drop_order"):
        space.schedule(space.full_plan(), order)


def test_plans_cover_the_space_once_and_narrow_by_grid(space: KnobSpace) -> None:
    plans = space.plans()
    assert len(plans) == len(set(plans)) == 3 * 5 * (5 + 4 + 3 + 2 + 1)
    assert set(plans) == set(all_valid_plans(space))
    for plan in plans:
        space.validate(plan)
    assert space.full_plan() in plans and space.cheapest_plan() in plans
    at_one = space.plans({"insert_pos": (1,)})
    assert {(p.max_crops, p.top_k, p.n_blocks) for p in at_one} == set(
        itertools.product((3, 6, 12), (4, 5, 6, 7, 8), (12, 13, 14, 15, 16))
    )
    narrowed = space.plans({"max_crops": (3,), "top_k": (4, 8), "insert_pos": (1,)})
    assert {(p.max_crops, p.top_k) for p in narrowed} == {(3, 4), (3, 8)}
    with pytest.raises(ValueError, match=r"top_k values \[3\] are not in the model's knob space"):
        space.plans({"top_k": (3,)})
    with pytest.raises(ValueError, match="unknown knob 'crops'"):
        space.plans({"crops": (3,)})


def test_knobs_are_the_plan_fields_marked_knob(space: KnobSpace) -> None:
    assert KNOBS == ("max_crops", "top_k", "n_blocks", "insert_pos")
    assert {k: space.options(k) for k in KNOBS} == {
        "max_crops": (3, 6, 12), "top_k": (4, 5, 6, 7, 8), "n_blocks": (12, 13, 14, 15, 16), "insert_pos": (1, 2, 3, 4, 5)
    }  # fmt: skip
    assert space.expert_work(Plan(12, 4, 16, insert_pos=5)) == 5 * 8 + 11 * 4
    assert space.expert_work(Plan(12, 6, 13, insert_pos=1)) == 8 + 12 * 6


def test_plan_to_dict_round_trips() -> None:
    plan = Plan(max_crops=6, top_k=5, n_blocks=14, insert_pos=2, renormalize=True)
    assert plan.to_dict() == {"max_crops": 6, "top_k": 5, "n_blocks": 14, "insert_pos": 2, "renormalize": True}
    assert Plan(**plan.to_dict()) == plan
