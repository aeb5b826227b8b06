"""The lookup controller (budget -> plan table, request-aware mode, artifact) and the per-sample oracle,
on hand-made profile rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_records import make_record, write_profile

from lmms_adaptive.controllers import load_controller
from lmms_adaptive.controllers import lookup as controller_module
from lmms_adaptive.controllers.base import ArtifactError, Stage1, read_artifact
from lmms_adaptive.controllers.lookup import Choice, LookupController, LookupTable, lookup_artifact
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.plan import KnobSpace, Plan, RequestFacts
from lmms_adaptive.serving.records import RequestRecord
from lmms_adaptive.tools import lookup

FP = "model-under-test"
# the MolmoE-1B knob space
REAL_CONFIG = Path(__file__).resolve().parents[1] / "lmms_adaptive" / "resources" / "molmoe_config.json"
KNOBS = KnobSpace.from_config(MolmoeConfig.from_dict(json.loads(REAL_CONFIG.read_text())))
MODEL = SimpleNamespace(knobs=KNOBS, model_id=FP)  # what a controller reads of the loaded model
LOW, MID, HIGH = Plan(3, 4, 12), Plan(6, 6, 14), Plan(12, 8, 16)
NEAR = Plan(12, 8, 14)


def make_row(plan: Plan = HIGH, task: str = "vqa", doc_id: int = 0, score: float = 1.0, total_ms: float = 100.0,
             n_output_tokens: int = 3, model_fingerprint: str = FP, device: str = "test-gpu") -> RequestRecord:  # fmt: skip
    n_crops = plan.max_crops + 1
    n_image, n_text = 100 * n_crops, 20
    return make_record(
        task=task, doc_id=doc_id, plan=plan, n_crops=n_crops, n_image_tokens=n_image, n_text_tokens=n_text,
        n_prompt_tokens=n_image + n_text, n_output_tokens=n_output_tokens, max_new_tokens=16,
        preprocess_ms=0.1 * total_ms, vision_ms=0.3 * total_ms, prefill_ms=0.3 * total_ms,
        decode_ms=[0.3 * total_ms / n_output_tokens] * n_output_tokens, total_ms=total_ms, score=score, answer="a",
        device=device, model_fingerprint=model_fingerprint,
    )  # fmt: skip


def sweep(measured: dict[Plan, list[tuple[float, float]]], task: str = "vqa", **kw) -> list[RequestRecord]:
    """Rows from {plan: [(score, total_ms) of doc 0, doc 1, ...]}."""
    return [
        make_row(plan, task, doc, score, ms, **kw)
        for plan, cells in measured.items()
        for doc, (score, ms) in enumerate(cells)
    ]


# LOW: score 0.5 at 50 ms, MID: 0.75 at 100 ms, HIGH: 1.0 at 200 ms (means)
THREE = {LOW: [(0.0, 40.0), (1.0, 60.0)], MID: [(1.0, 90.0), (0.5, 110.0)], HIGH: [(1.0, 190.0), (1.0, 210.0)]}


def three_table(**kw) -> LookupTable:
    return lookup.build_table(sweep(THREE), **{"latency_stat": "mean", **kw})


# -- the table ----------------------------------------------------------------------------------------


def test_entries_hold_the_plan_statistics() -> None:
    table = three_table()
    assert [e.plan for e in table.entries] == [LOW, MID, HIGH]
    mid = table.entries[1]
    assert (mid.score, mid.latency_ms, mid.n_samples) == (0.75, 100.0, 2)
    assert (mid.mean_prompt_tokens, mid.mean_output_tokens, mid.mean_crops) == (720.0, 3.0, 7.0)


@pytest.mark.parametrize(
    ("budget", "plan", "fits"),
    [
        (None, HIGH, True),
        (10.0, LOW, False),  # nothing fits: the cheapest, flagged
        (50.0, LOW, True),  # exactly the measured latency fits
        (75.0, LOW, True),  # between measured latencies
        (100.0, MID, True),
        (150.0, MID, True),
        (200.0, HIGH, True),
        (1e6, HIGH, True),  # beyond every measured latency
    ],
)
def test_pick_for_budgets(budget: float | None, plan: Plan, fits: bool) -> None:
    choice = three_table().pick(budget)
    assert (choice.plan, choice.fits) == (plan, fits)


def test_pick_returns_expected_score_and_latency() -> None:
    assert three_table().pick(150.0) == Choice(MID, 0.75, 100.0, True)
    assert three_table().pick(1.0) == Choice(LOW, 0.5, 50.0, False)


def test_latency_statistic_decides_what_fits() -> None:
    rows = sweep(THREE)
    p90 = lookup.build_table(rows, latency_stat="p90")
    assert p90.entries[1].latency_ms == pytest.approx(108.0)  # 90 + 0.9 * (110 - 90)
    assert lookup.build_table(rows, latency_stat="mean").pick(105.0).plan == MID
    assert lookup.build_table(rows, latency_stat="p50").pick(105.0).plan == MID
    assert p90.pick(105.0).plan == LOW


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"aggregation": "best"}, "aggregation must be one of"),
        ({"latency_stat": "p101"}, "percentile"),
        ({"latency_stat": "q5"}, "percentile"),
        ({"tolerance": -0.1}, "tolerance must be >= 0"),
        ({"aggregation": "max_accuracy", "tolerance": 0.1}, "strictly"),
    ],
)
def test_invalid_settings_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        three_table(**kw)


def test_ties_are_broken_by_latency_then_plan_order() -> None:
    a, b, c = Plan(3, 4, 12), Plan(3, 5, 12), Plan(3, 6, 12)
    same = {c: [(1.0, 50.0)], b: [(1.0, 50.0)], a: [(1.0, 50.0)]}
    assert lookup.build_table(sweep(same), latency_stat="mean").pick(100.0).plan == a
    assert lookup.build_table(list(reversed(sweep(same))), latency_stat="mean").pick(100.0).plan == a
    faster_later = {a: [(1.0, 60.0)], b: [(1.0, 40.0)]}
    assert lookup.build_table(sweep(faster_later), latency_stat="mean").pick(100.0).plan == b
    # equal means up to float summation noise are a tie too: the faster plan wins
    noisy = {a: [(0.1, 60.0), (0.2, 60.0), (0.3, 60.0)], b: [(0.3, 40.0), (0.2, 40.0), (0.1, 40.0)]}
    assert lookup.build_table(sweep(noisy), latency_stat="mean").pick(100.0).plan == b


@pytest.mark.parametrize(
    ("tolerance", "budget", "plan"),
    [
        (0.0, 250.0, HIGH),
        (0.05, 250.0, NEAR),
        (0.3, 250.0, MID),
        (0.5, 250.0, LOW),
        (0.05, 120.0, MID),
        (0.3, 120.0, LOW),
    ],
)
def test_tolerance_takes_the_fastest_plan_close_to_the_best(tolerance: float, budget: float, plan: Plan) -> None:
    rows = sweep({**THREE, NEAR: [(1.0, 140.0), (0.94, 160.0)]})  # NEAR: 0.97 at 150 ms
    assert lookup.build_table(rows, latency_stat="mean", tolerance=tolerance).pick(budget).plan == plan


def test_median_and_mean_aggregations() -> None:
    a, b = Plan(3, 4, 12), Plan(12, 8, 16)
    rows = sweep({a: [(0.0, 100.0), (1.0, 100.0), (1.0, 100.0)], b: [(1.0, 150.0), (1.0, 150.0), (0.9, 150.0)]})
    mean = lookup.build_table(rows, aggregation="mean", latency_stat="mean")
    median = lookup.build_table(rows, aggregation="median", latency_stat="mean")
    assert [e.score for e in mean.entries] == pytest.approx([2 / 3, 2.9 / 3])
    assert [e.score for e in median.entries] == [1.0, 1.0]
    assert mean.pick(200.0).plan == b
    assert median.pick(200.0).plan == a  # both have median 1: the faster


def test_max_accuracy_is_the_best_mean_score_ties_to_the_fastest() -> None:
    rows = sweep({**THREE, NEAR: [(1.0, 140.0), (1.0, 160.0)]})  # NEAR: as good as HIGH, faster
    strict = lookup.build_table(rows, aggregation="max_accuracy", latency_stat="mean")
    assert [e.score for e in strict.entries] == [0.5, 0.75, 1.0, 1.0]
    assert strict.pick(250.0).plan == NEAR
    assert strict.pick(None).plan == NEAR
    assert strict.pick(120.0).plan == MID


def test_interrupted_sweep_keeps_every_plan_on_the_common_samples() -> None:
    rows = sweep(THREE) + [make_row(LOW, doc_id=2, score=1.0, total_ms=10.0)]  # the sweep died after LOW on doc 2
    table = lookup.build_table(rows, latency_stat="mean")
    assert [e.plan for e in table.entries] == [LOW, MID, HIGH]
    assert table.dropped_plans == ()
    assert table.entries[0].n_samples == 2
    assert (table.entries[0].score, table.entries[0].latency_ms) == (0.5, 50.0)  # doc 2 not counted


def test_plan_measured_on_few_samples_is_dropped() -> None:
    full = {LOW: [(0.0, 40.0)] * 4, HIGH: [(1.0, 200.0)] * 4}
    rows = sweep(full) + [make_row(NEAR, doc_id=0, score=1.0, total_ms=10.0)]  # added later, one sample only
    table = lookup.build_table(rows, latency_stat="mean")
    assert [e.plan for e in table.entries] == [LOW, HIGH]
    assert table.dropped_plans == (NEAR,)
    assert table.entries[0].n_samples == 4


def test_no_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="no profile rows"):
        lookup.build_table([])


# -- request-aware mode -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakePrediction:
    total_ms: float


class FakeEstimator:
    """Linear in crops, prompt tokens and output tokens; remembers what it was asked."""

    def __init__(self, ms_per_crop: float = 10.0, ms_per_prompt_token: float = 0.1, ms_per_output_token: float = 5.0,
                 model_fingerprint: str = FP, device: str = "test-gpu") -> None:  # fmt: skip
        self.coef = (ms_per_crop, ms_per_prompt_token, ms_per_output_token)
        self.model_fingerprint, self.device = model_fingerprint, device
        self.calls: list[tuple[Plan, int, int, int]] = []

    def predict(
        self, plan: Plan, n_crops: int, n_prompt_tokens: int, n_output_tokens: int, *, image_pixels: int
    ) -> FakePrediction:
        assert image_pixels == sum(h * w for h, w in SMALL_IMAGE.image_sizes)  # the request's own images
        self.calls.append((plan, n_crops, n_prompt_tokens, n_output_tokens))
        c, p, o = self.coef
        return FakePrediction(c * n_crops + p * n_prompt_tokens + o * n_output_tokens)

    def to_dict(self) -> dict:
        return {"coef": list(self.coef), "model_fingerprint": self.model_fingerprint, "device": self.device}

    @classmethod
    def from_dict(cls, d: dict) -> FakeEstimator:
        return cls(*d["coef"], model_fingerprint=d["model_fingerprint"], device=d["device"])

    @classmethod
    def load(cls, path: Path) -> FakeEstimator:
        return cls.from_dict(json.loads(path.read_text()))


@pytest.fixture()
def fake_estimator_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`FakeEstimator` where the lookup controller and the lookup tool read a `LatencyEstimator`."""
    monkeypatch.setattr(controller_module, "LatencyEstimator", FakeEstimator)
    monkeypatch.setattr(lookup, "LatencyEstimator", FakeEstimator)


def facts(
    budget: float | None, crops: dict[int, int], prompt: dict[int, int], max_new_tokens: int = 16
) -> RequestFacts:
    return RequestFacts(budget, "what is it?", ((480, 640),), prompt, crops, 20, max_new_tokens, "vqa")


SMALL_IMAGE = facts(200.0, crops={3: 2, 6: 4, 12: 7}, prompt={3: 300, 6: 600, 12: 1100})
LARGE_IMAGE = facts(200.0, crops={3: 4, 6: 7, 12: 13}, prompt={3: 600, 6: 1200, 12: 2300})


def two_tier_table() -> LookupTable:
    low, high = Plan(3, 8, 16), Plan(12, 8, 16)  # measured on typical images: 60 ms and 150 ms
    return lookup.build_table(sweep({low: [(0.6, 60.0)], high: [(0.9, 150.0)]}), latency_stat="mean")


def test_request_aware_moves_a_large_image_to_a_cheaper_tier() -> None:
    table = two_tier_table()
    aware = LookupController(table, KNOBS, FakeEstimator())
    blind = LookupController(table, KNOBS)
    assert blind.stage1(SMALL_IMAGE).max_crops == blind.stage1(LARGE_IMAGE).max_crops == 12
    assert aware.choose(SMALL_IMAGE) == Choice(Plan(12, 8, 16), 0.9, 70 + 110 + 15, True)
    assert aware.choose(LARGE_IMAGE) == Choice(Plan(3, 8, 16), 0.6, 40 + 60 + 15, True)
    assert (
        aware.choose(facts(None, LARGE_IMAGE.crops_per_tier, LARGE_IMAGE.prompt_tokens_per_tier)).plan.max_crops == 12
    )


def test_request_aware_uses_this_requests_tokens_and_capped_output_length() -> None:
    low, high = Plan(3, 8, 16), Plan(12, 8, 16)
    rows = sweep({low: [(0.6, 60.0), (0.6, 60.0)], high: [(0.9, 150.0), (0.9, 150.0)]})
    rows = [
        r if r.doc_id == 0 else make_row(r.plan, doc_id=1, score=r.score, total_ms=r.total_ms, n_output_tokens=2)
        for r in rows
    ]
    table = lookup.build_table(rows, latency_stat="mean")  # mean output tokens 2.5 -> 3
    estimator = FakeEstimator()
    LookupController(table, KNOBS, estimator).choose(SMALL_IMAGE)
    assert estimator.calls == [(low, 2, 300, 3), (high, 7, 1100, 3)]
    estimator.calls.clear()
    LookupController(table, KNOBS, estimator).choose(
        facts(200.0, SMALL_IMAGE.crops_per_tier, SMALL_IMAGE.prompt_tokens_per_tier, 2)
    )
    assert [call[3] for call in estimator.calls] == [2, 2]


def test_request_aware_needs_plans_at_model_tiers() -> None:
    odd = lookup.build_table(sweep({Plan(5, 8, 16): [(1.0, 10.0)]}), latency_stat="mean")
    LookupController(odd, KNOBS)  # table mode compares measured latencies: any valid max_crops
    with pytest.raises(ValueError, match="at a tier"):
        LookupController(odd, KNOBS, FakeEstimator())


def test_stage1_decides_the_whole_plan_and_describe() -> None:
    controller = LookupController(three_table(), KNOBS)
    assert controller.stage1(facts(150.0, {}, {})) == Stage1(MID.max_crops, MID.insert_pos, MID)
    assert controller.describe() == {"kind": "lookup", "mode": "table", "aggregation": "mean", "latency_stat": "mean",
                                     "tolerance": 0.0, "n_plans": 3}  # fmt: skip
    assert LookupController(three_table(), KNOBS, FakeEstimator()).describe()["mode"] == "request_aware"


# -- artifact -----------------------------------------------------------------------------------------


def write_artifact(tmp_path: Path, artifact: dict) -> Path:
    path = tmp_path / "lookup.json"
    path.write_text(json.dumps(artifact))
    return path


def test_artifact_round_trip_through_load_controller(tmp_path: Path) -> None:
    table = lookup.build_table(
        sweep(THREE) + [make_row(NEAR, doc_id=0)], aggregation="mean", latency_stat="p90", tolerance=0.1
    )
    source = {"profile": "runs/profile", "n_rows": 7, "created": "2025-01-01T00:00:00+00:00"}
    artifact = lookup_artifact(table, FP, KNOBS, "test-gpu", source=source)
    assert set(artifact) == {
        "kind",
        "model_fingerprint",
        "knob_space",
        "device",
        "settings",
        "entries",
        "dropped_plans",
        "estimator",
        "source",
    }
    assert artifact["settings"] == {"mode": "table", "aggregation": "mean", "latency_stat": "p90", "tolerance": 0.1}
    assert (artifact["estimator"], artifact["source"], artifact["dropped_plans"]) == (None, source, [NEAR.to_dict()])
    controller = load_controller(read_artifact(write_artifact(tmp_path, artifact), FP, KNOBS), MODEL)
    assert isinstance(controller, LookupController)
    assert controller.table == table
    for budget in (None, 10.0, 75.0, 105.0, 1000.0):
        assert controller.choose(facts(budget, {}, {})) == table.pick(budget)


def test_artifact_of_another_model_is_refused(tmp_path: Path) -> None:
    path = write_artifact(tmp_path, lookup_artifact(three_table(), FP, KNOBS, "test-gpu"))
    with pytest.raises(ArtifactError, match="made for model model-under-test"):
        read_artifact(path, "another-model", KNOBS)


@pytest.mark.usefixtures("fake_estimator_module")
def test_request_aware_artifact_round_trip(tmp_path: Path) -> None:
    table = two_tier_table()
    artifact = lookup_artifact(table, FP, KNOBS, "test-gpu", FakeEstimator(ms_per_crop=20.0))
    assert artifact["settings"]["mode"] == "request_aware"
    assert artifact["estimator"] == {"coef": [20.0, 0.1, 5.0], "model_fingerprint": FP, "device": "test-gpu"}
    controller = load_controller(read_artifact(write_artifact(tmp_path, artifact), FP, KNOBS), MODEL)
    assert controller.describe()["mode"] == "request_aware"
    assert controller.estimator.coef == (20.0, 0.1, 5.0)
    assert controller.stage1(LARGE_IMAGE).max_crops == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("entries"), "malformed table"),
        (lambda a: a["settings"].update(aggregation="best"), "malformed table"),
        (lambda a: a["entries"][0]["plan"].update(n_blocks=3), "n_blocks"),
    ],
)
def test_malformed_artifact_is_refused(change, message: str) -> None:
    artifact = json.loads(json.dumps(lookup_artifact(three_table(), FP, KNOBS, "test-gpu")))
    change(artifact)
    with pytest.raises(ArtifactError, match=message):
        load_controller(artifact, MODEL)


# -- oracle -------------------------------------------------------------------------------------------


def test_oracle_picks_each_samples_best_fitting_plan() -> None:
    rows = sweep(THREE) + [
        make_row(MID, doc_id=2, score=1.0, total_ms=300.0),
        make_row(HIGH, doc_id=2, score=1.0, total_ms=280.0),
    ]

    def picks(budget: float | None) -> list[tuple[int, Plan, bool]]:
        return [(c.row.doc_id, c.row.plan, c.violated) for c in lookup.oracle(rows, budget)]

    # doc 0: LOW 0@40, MID 1@90, HIGH 1@190; doc 1: LOW 1@60, MID .5@110, HIGH 1@210; doc 2: MID 1@300, HIGH 1@280
    assert picks(100.0) == [(0, MID, False), (1, LOW, False), (2, HIGH, True)]
    assert picks(250.0) == [(0, MID, False), (1, LOW, False), (2, HIGH, True)]  # score ties: the faster row
    assert picks(30.0) == [(0, LOW, True), (1, LOW, True), (2, HIGH, True)]
    assert picks(None) == [(0, MID, False), (1, LOW, False), (2, HIGH, False)]


def test_oracle_breaks_full_ties_by_plan_order() -> None:
    a, b = Plan(3, 4, 12), Plan(3, 5, 12)
    rows = sweep({b: [(1.0, 50.0)], a: [(1.0, 50.0)]})
    assert lookup.oracle(rows, 100.0)[0].row.plan == a


def test_oracle_summary_matches_hand_computation() -> None:
    rows = sweep(
        {LOW: [(0.0, 40.0), (1.0, 50.0), (0.0, 120.0)], HIGH: [(1.0, 200.0), (1.0, 210.0), (1.0, 300.0)]}, task="a"
    )
    rows += sweep({LOW: [(1.0, 30.0)]}, task="b")
    summary = [s for s in lookup.oracle_summary(rows, [100.0, 250.0]) if s.name == "oracle"]
    assert [(s.task, s.budget_ms, s.n_samples) for s in summary] == [
        ("a", 100.0, 3),
        ("a", 250.0, 3),
        ("b", 100.0, 1),
        ("b", 250.0, 1),
    ]
    a100, a250, b100, _ = summary
    # budget 100: LOW everywhere (doc 2 violated: 120 ms)
    assert a100.score == pytest.approx(1 / 3)
    assert a100.latency_mean_ms == pytest.approx(70.0)
    assert a100.latency_p95_ms == pytest.approx(50 + 0.9 * 70)
    assert a100.violation_rate == pytest.approx(1 / 3)
    assert a100.knobs == {"max_crops": 3.0, "top_k": 4.0, "n_blocks": 12.0, "insert_pos": 1.0}
    # budget 250: doc 0 HIGH 1@200, doc 1 LOW 1@50 (tie, faster), doc 2 LOW 0@120 (HIGH needs 300)
    assert a250.score == pytest.approx(2 / 3)
    assert a250.latency_mean_ms == pytest.approx(370 / 3)
    assert a250.latency_p95_ms == pytest.approx(120 + 0.9 * 80)
    assert a250.violation_rate == 0.0
    assert a250.knobs == pytest.approx({"max_crops": 6.0, "top_k": 16 / 3, "n_blocks": 40 / 3, "insert_pos": 1.0})
    assert (b100.score, b100.latency_mean_ms, b100.latency_p95_ms, b100.violation_rate) == (1.0, 30.0, 30.0, 0.0)


def test_best_fixed_plan_is_the_best_scoring_plan_within_two_percent_violations() -> None:
    """50 docs per plan: MID scores best but 2 of 50 (4 %) run over 150 ms, 1 of 50 (2 %) over 200 ms."""
    fast = [(0.5, 40.0)] * 50
    mid = [(0.8, 100.0)] * 48 + [(0.8, 180.0), (0.8, 250.0)]
    slow = [(0.9, 400.0)] * 50
    rows = sweep({LOW: fast, MID: mid, HIGH: slow})

    def pick(budget: float | None) -> tuple[Plan, float]:
        chosen = lookup.best_fixed_plan(rows, budget)
        assert [c.row.doc_id for c in chosen] == list(range(50)) and len({c.row.plan for c in chosen}) == 1
        return chosen[0].row.plan, sum(c.violated for c in chosen) / len(chosen)

    assert pick(150.0) == (LOW, 0.0)  # MID's 4 % is over the limit
    assert pick(200.0) == (MID, 0.02)  # exactly the limit: allowed
    assert pick(500.0) == (HIGH, 0.0)
    assert pick(None) == (HIGH, 0.0)
    assert pick(30.0) == (LOW, 1.0)  # nothing fits: the plan with the fewest violations
    tie = sweep({MID: [(1.0, 50.0)], LOW: [(1.0, 20.0)]})
    assert lookup.best_fixed_plan(tie, 100.0)[0].row.plan == LOW  # equal scores: the faster plan
    names = {s.name for s in lookup.oracle_summary(rows, [200.0])}
    assert names == {"oracle", "oracle per question type", "best fixed plan"}


def test_the_type_oracle_takes_one_table_per_question_type() -> None:
    color = [
        replace(r, question_type="color")
        for r in sweep({LOW: [(1.0, 40.0), (1.0, 50.0)], HIGH: [(1.0, 200.0), (1.0, 210.0)]})
    ]
    read = [
        replace(r, doc_id=r.doc_id + 2, question_type="read")
        for r in sweep({LOW: [(0.0, 60.0), (0.0, 70.0)], HIGH: [(1.0, 220.0), (0.0, 230.0)]})
    ]  # fmt: skip
    rows = color + read

    def picks(budget: float) -> list[tuple[int, Plan, bool]]:
        return [(c.row.doc_id, c.row.plan, c.violated) for c in lookup.type_oracle(rows, budget, latency_stat="mean")]

    # colour: both plans score 1, LOW is faster; reading: HIGH scores 0.5 against 0 but costs 225 ms on average
    assert picks(300.0) == [(0, LOW, False), (1, LOW, False), (2, HIGH, False), (3, HIGH, False)]
    assert picks(100.0) == [(0, LOW, False), (1, LOW, False), (2, LOW, False), (3, LOW, False)]
    assert picks(225.0) == [(0, LOW, False), (1, LOW, False), (2, HIGH, False), (3, HIGH, True)]  # 230 > 225
    by_name = {s.name: s for s in lookup.oracle_summary(rows, [300.0])}
    assert set(by_name) == {"oracle", "oracle per question type", "best fixed plan"}
    assert by_name["oracle per question type"].score == pytest.approx(0.75)
    assert by_name["oracle"].score == pytest.approx(0.75)  # the per-sample bound: doc 3 scores 0 either way


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_build_and_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fp = FP
    rows = sweep(THREE) + sweep({HIGH: [(0.0, 900.0)]}, task="other")
    profile = write_profile(tmp_path / "profile", rows, KNOBS).parent
    out = tmp_path / "controllers" / "vqa.json"
    lookup.main(
        [
            "build",
            str(profile),
            "--out",
            str(out),
            "--latency-stat",
            "mean",
            "--task",
            "vqa",
        ]
    )
    artifact = read_artifact(out, fp, KNOBS)
    assert artifact["device"] == "test-gpu"
    assert artifact["source"]["n_rows"] == 6 and artifact["source"]["tasks"] == ["vqa"]
    assert load_controller(artifact, MODEL).table == three_table()
    capsys.readouterr()
    lookup.main(["show", str(out), "--budgets", "10,100,1000"])
    lines = capsys.readouterr().out.splitlines()
    assert "aggregation mean, latency mean" in lines[0]
    assert [line.split()[:2] for line in lines[-3:]] == [
        ["10", "crops3_k4_b12_p1"],
        ["100", "crops6_k6_b14_p1"],
        ["1000", "crops12_k8_b16_p1"],
    ]
    assert lines[-3].endswith("NO (cheapest)") and lines[-1].endswith("yes")


def test_cli_refuses_rows_of_several_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = write_profile(
        tmp_path / "profile", sweep(THREE) + sweep({NEAR: [(1.0, 9.0)]}, model_fingerprint="other"), KNOBS
    ).parent
    with pytest.raises(SystemExit):
        lookup.main(["build", str(profile), "--out", str(tmp_path / "x.json")])
    assert "come from 2 models" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.usefixtures("fake_estimator_module")
def test_cli_request_aware_refuses_an_estimator_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fp = FP
    profile = write_profile(tmp_path / "profile", sweep(THREE), KNOBS).parent
    for name, model in (("ours", fp), ("theirs", "another-model")):
        (tmp_path / f"{name}.json").write_text(json.dumps(FakeEstimator(model_fingerprint=model).to_dict()))
    out = tmp_path / "aware.json"
    common = ["build", str(profile), "--out", str(out), "--request-aware"]
    lookup.main([*common, "--estimator", str(tmp_path / "ours.json")])
    artifact = read_artifact(out, fp, KNOBS)
    assert artifact["settings"]["mode"] == "request_aware"
    assert artifact["estimator"] == FakeEstimator(model_fingerprint=fp).to_dict()
    with pytest.raises(SystemExit):
        lookup.main([*common, "--estimator", str(tmp_path / "theirs.json")])
    assert "was fitted on model another-model" in capsys.readouterr().err
