"""The latency estimator's predictions: per-stage linear models over physically motivated features.

A controller asks `LatencyEstimator.predict(plan, n_crops, n_prompt_tokens, n_output_tokens, image_pixels=...)`
for every candidate plan of a request, so prediction is a handful of float operations (microseconds, no
numpy). Fitting, evaluation and plots are `lmms_adaptive.tools.estimator`.

Notation: C = n_crops (ViT crops), P = image_pixels / 1e6 (the source images' megapixels), L =
n_prompt_tokens, B = n_blocks (active decoder blocks), K_sum = the MoE top-k summed over the active blocks
(`KnobSpace.expert_work`: the blocks up to the insertion position run at the model's own top-k).

Stage models (milliseconds; every coefficient is non-negative, so a larger plan is never predicted to be
faster than a smaller one, which is what a controller relies on when it walks the knob space):
- preprocess: [1, C, P] (resizing the source image scales with its pixels, cropping and normalising with
  the crops);
- vision: [1, C] (the ViT runs once per crop, at batch size 1);
- prefill: [1, B, B*L, K_sum*L, B*L^2]: per-block launches and expert weight reads (B), dense attention
  projections per token (B*L), the k experts each token runs through (K_sum*L), attention scores (B*L^2);
- decode step at context length c = L + t (the t-th decode forward, t >= 1): [1, B, K_sum, B*c]: the LM
  head and embedding (1), per-block attention weights (B), the k gathered experts per block (K_sum), the
  KV cache read (B*c). The features are affine in c, so the sum over a whole answer has a closed form;
- overhead: [n_forwards]: what the end-to-end latency holds beyond the timed stages (request facts, the
  controller, sampling, EOS checks), per forward pass.
The MoE `renormalize` knob does not change the work done and is not a feature.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_adaptive.controllers.base import knob_space_from_json, knob_space_json
from lmms_adaptive.core.plan import KnobSpace, Plan

FORMAT = "lmms_adaptive.latency_estimator"
FORMAT_VERSION = 3  # 2: preprocess also scales with the source megapixels; 3: the knob space replaces model_top_k
STAGES = ("preprocess", "vision", "prefill", "decode", "overhead")
FEATURES: dict[str, tuple[str, ...]] = {
    "preprocess": ("1", "C", "P"),
    "vision": ("1", "C"),
    "prefill": ("1", "B", "B*L", "K_sum*L", "B*L^2"),
    "decode": ("1", "B", "K_sum", "B*c"),
    "overhead": ("n_forwards",),
}


# Feature functions: plain arithmetic, so they serve scalars (predict) and numpy arrays (fit) alike.
def preprocess_features(n_crops: Any, image_pixels: Any) -> tuple[Any, ...]:
    return 1.0, n_crops, image_pixels / 1e6


def crop_features(n_crops: Any) -> tuple[Any, ...]:
    return 1.0, n_crops


def prefill_features(blocks: Any, k_sum: Any, prompt: Any) -> tuple[Any, ...]:
    return 1.0, blocks, blocks * prompt, k_sum * prompt, blocks * prompt * prompt


def decode_features(blocks: Any, k_sum: Any, context: Any) -> tuple[Any, ...]:
    return 1.0, blocks, k_sum, blocks * context


def overhead_features(n_forwards: Any) -> tuple[Any, ...]:
    return (n_forwards,)


@dataclass(frozen=True)
class LatencyPrediction:
    """Predicted milliseconds per stage; `decode_ms` is the sum over the decode steps, `overhead_ms` the host
    time between stages, and `total_ms` the sum of all of them."""

    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    overhead_ms: float
    total_ms: float


@dataclass(frozen=True)
class StageModel:
    """A fitted linear model of one stage: `features` names the columns `coef` multiplies."""

    features: tuple[str, ...]
    coef: tuple[float, ...]

    def at(self, values: tuple[float, ...]) -> float:
        return sum(map(operator.mul, self.coef, values))


@dataclass(frozen=True)
class LatencyEstimator:
    """One fitted `StageModel` per stage, for one device and model (see the module docstring)."""

    knobs: KnobSpace
    preprocess: StageModel
    vision: StageModel
    prefill: StageModel
    decode: StageModel
    overhead: StageModel
    device: str
    model_fingerprint: str
    n_rows: int
    fitted_at: str

    # -- prediction -------------------------------------------------------------------------------------

    def decode_step_ms(self, plan: Plan, context_len: int) -> float:
        """One decode forward whose context (prompt plus tokens so far, itself included) is `context_len`."""
        return self.decode.at(decode_features(plan.n_blocks, self.knobs.expert_work(plan), context_len))

    def predict(
        self, plan: Plan, n_crops: int, n_prompt_tokens: int, n_output_tokens: int, *, image_pixels: int
    ) -> LatencyPrediction:
        """Latency of a request that emits `n_output_tokens` tokens (counting a final EOS): the first comes
        from prefill, each further one from a decode forward at context n_prompt_tokens + t, t = 1..n-1.
        `image_pixels`: height x width summed over the request's source images (0 without images)."""
        if n_output_tokens < 0:
            raise ValueError(f"n_output_tokens must be >= 0, got {n_output_tokens}")
        blocks, k_sum, prompt = plan.n_blocks, self.knobs.expert_work(plan), n_prompt_tokens
        steps = max(n_output_tokens - 1, 0)
        step_at_0 = self.decode.at(decode_features(blocks, k_sum, 0))
        per_context = self.decode.at(decode_features(blocks, k_sum, 1)) - step_at_0
        preprocess = self.preprocess.at(preprocess_features(n_crops, image_pixels))
        vision = self.vision.at(crop_features(n_crops))
        prefill = self.prefill.at(prefill_features(blocks, k_sum, prompt))
        decode = steps * step_at_0 + per_context * (steps * prompt + steps * (steps + 1) / 2)
        overhead = self.overhead.at(overhead_features(steps + 1))
        return LatencyPrediction(
            preprocess, vision, prefill, decode, overhead, preprocess + vision + prefill + decode + overhead
        )

    # -- serialisation ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "knob_space": knob_space_json(self.knobs),
            "stages": {
                name: {"features": list(m.features), "coef": list(m.coef)}
                for name, m in ((name, getattr(self, name)) for name in STAGES)
            },
            "metadata": {
                "device": self.device,
                "model_fingerprint": self.model_fingerprint,
                "n_rows": self.n_rows,
                "fitted_at": self.fitted_at,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyEstimator:
        """Inverse of `to_dict`; raises ValueError naming the first missing or invalid key."""
        if _get(d, "format") != FORMAT:
            raise ValueError(f"'format' is {d['format']!r}, expected {FORMAT!r}")
        if _get(d, "version") != FORMAT_VERSION:
            raise ValueError(f"'version' is {d['version']!r}, this code reads version {FORMAT_VERSION}")
        stages = _get(d, "stages")
        meta = _get(d, "metadata")
        return cls(
            knobs=knob_space_from_json(_get(d, "knob_space")),
            **{name: _stage_from_dict(name, _get(stages, name, f"stages.{name}")) for name in STAGES},
            device=str(_get(meta, "device", "metadata.device")),
            model_fingerprint=str(_get(meta, "model_fingerprint", "metadata.model_fingerprint")),
            n_rows=int(_get(meta, "n_rows", "metadata.n_rows")),
            fitted_at=str(_get(meta, "fitted_at", "metadata.fitted_at")),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyEstimator:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON latency estimator ({err})") from err
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _get(d: Any, key: str, where: str | None = None) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"missing key '{where or key}'")
    return d[key]


def _stage_from_dict(name: str, d: Any) -> StageModel:
    features = tuple(_get(d, "features", f"stages.{name}.features"))
    coef = _get(d, "coef", f"stages.{name}.coef")
    if features != FEATURES[name]:
        raise ValueError(f"'stages.{name}.features' is {list(features)}, this code computes {list(FEATURES[name])}")
    if not isinstance(coef, list) or len(coef) != len(features) or not all(isinstance(c, (int, float)) for c in coef):
        raise ValueError(f"'stages.{name}.coef' must be {len(features)} numbers, got {coef!r}")
    return StageModel(features, tuple(float(c) for c in coef))
