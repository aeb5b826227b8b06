"""MolmoE configuration read from a checkpoint folder's real `config.json`.

Every key of the official MolmoE-1B-0924 config is either understood (a field below), checked to hold
the only value this implementation supports (`_SUPPORTED`), or deliberately ignored because it only
matters for training or for the original remote code (`_IGNORED`). Anything else is logged once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keys whose value must be exactly this for the architecture implemented here.
_SUPPORTED: dict[str, Any] = {
    "activation_type": "swiglu",
    "alibi": False,
    "attention_layer_norm": True,
    "attention_layer_norm_with_affine": True,
    "attn_logit_softcapping": None,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "moe",
    "clip_qkv": None,
    "crop_mode": "overlap-and-resize-c2",
    "final_logit_softcapping": None,
    "image_padding_embed": "pad_and_partial_pad",
    "image_pooling_2d": "attention-meanq",
    "image_pooling_h": 2,
    "image_pooling_w": 2,
    "image_projector": "mlp",
    "include_bias": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "moe_dropless": True,
    "moe_shared_expert": False,
    "multi_query_attention": None,
    "norm_after": False,
    "normalize_input_embeds": False,
    "qkv_bias": False,
    "rope": True,
    "rope_impl": "llama",
    "scale_logits": False,
    "use_cls_feature": False,
    "use_col_tokens": True,
    "use_position_ids": True,
    "weight_tying": False,
}

# Training-time, bookkeeping or remote-code keys that do not change inference here.
_IGNORED = frozenset(
    {
        "alibi_bias_max", "auto_map", "architectures", "attention_dropout", "attention_type", "always_start_with_space",
        "default_inference_len", "do_random_scale", "embedding_dropout", "fix_image_input_idx",
        "float32_attention", "gin_bindings", "image_feature_dropout", "init_cutoff_factor", "init_device",
        "init_fn", "init_std", "initializer_range", "llm_load_path", "loss_token_weighting", "low_cpu_fsdp",
        "max_position_embeddings", "message_formatting", "mlp_hidden_size",
        "model_type", "moe_capacity_factor", "moe_interleave", "moe_lbl_in_fp32", "moe_log_expert_assignment",
        "moe_loss_weight", "moe_mlp_impl", "moe_zloss_weight", "new_embedding_init_range", "pad_to",
        "pad_tokenizer", "pad_token_id", "precision", "prompt_override", "prompt_type",
        "query_pre_attn_scalar", "residual_dropout", "response_attention_dropout",
        "response_residual_dropout", "rope_full_precision", "system_prompt_kind", "transformers_version",
        "unconditioned", "use_cache", "vit_load_path", "overlap_margins",
    }
)  # fmt: skip

_VISION_SUPPORTED: dict[str, Any] = {"image_mlp_activations": "quick_gelu", "image_model_type": "openai"}
_VISION_IGNORED = frozenset(
    {"attention_dropout", "fsdp_wrap", "image_dropout_rate", "initializer_range", "residual_dropout", "resize_mode",
     "image_pos_patch_size", "image_default_input_size"}
)  # fmt: skip


class ConfigError(ValueError):
    """A checkpoint config that is missing a key, has a wrong type, or asks for an unsupported variant."""


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT of the vision backbone."""

    width: int
    head_dim: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    n_layers: int
    n_positions: int
    patch_size: int
    norm_eps: float

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclass(frozen=True)
class MolmoeConfig:
    """The LLM, the vision backbone and the connector, as read from `config.json`."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp_ratio: int
    vocab_size: int
    embedding_size: int
    additional_vocab_size: int
    layer_norm_eps: float
    rope_theta: float
    moe_num_experts: int
    moe_top_k: int
    max_crops: int
    max_sequence_length: int  # the context: prompt and answer tokens together
    vit_layers: tuple[int, ...]
    vision: VisionConfig

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_hidden(self) -> int:
        """Hidden width of one SwiGLU expert (and of the image projector): (mlp_ratio * d_model) // 2."""
        return (self.mlp_ratio * self.d_model) // 2

    @property
    def image_feature_dim(self) -> int:
        """Width of the concatenated ViT features fed to pooling."""
        return self.vision.width * len(self.vit_layers)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> MolmoeConfig:
        reader = _Reader(raw, source)
        for key, value in _SUPPORTED.items():
            reader.expect(key, value)
        n_kv = raw.get("n_kv_heads")
        if n_kv not in (None, raw.get("n_heads")):
            raise ConfigError(
                f"{source}: key 'n_kv_heads' = {n_kv!r}: only full multi-head attention (null or n_heads) is supported"
            )
        vision_raw = reader.get("vision_backbone", dict)
        vreader = _Reader(vision_raw, f"{source} [vision_backbone]")
        for key, value in _VISION_SUPPORTED.items():
            vreader.expect(key, value)
        vision = VisionConfig(
            width=vreader.get("image_emb_dim", int),
            head_dim=vreader.get("image_head_dim", int),
            n_heads=vreader.get("image_num_heads", int),
            n_kv_heads=vreader.get("image_num_key_value_heads", int),
            mlp_dim=vreader.get("image_mlp_dim", int),
            n_layers=vreader.get("image_num_layers", int),
            n_positions=vreader.get("image_num_pos", int),
            patch_size=vreader.get("image_patch_size", int),
            norm_eps=vreader.get("image_norm_eps", float),
        )
        if vision.n_kv_heads != vision.n_heads:
            raise ConfigError(f"{source}: vision_backbone.image_num_key_value_heads must equal image_num_heads")
        vreader.warn_unknown(set(_VISION_SUPPORTED) | _VISION_IGNORED)
        config = cls(
            d_model=reader.get("d_model", int),
            n_heads=reader.get("n_heads", int),
            n_layers=reader.get("n_layers", int),
            mlp_ratio=reader.get("mlp_ratio", int),
            vocab_size=reader.get("vocab_size", int),
            embedding_size=reader.get("embedding_size", int),
            additional_vocab_size=reader.get("additional_vocab_size", int),
            layer_norm_eps=reader.get("layer_norm_eps", float),
            rope_theta=reader.get("rope_theta", float),
            moe_num_experts=reader.get("moe_num_experts", int),
            moe_top_k=reader.get("moe_top_k", int),
            max_crops=reader.get("max_crops", int),
            max_sequence_length=reader.get("max_sequence_length", int),
            vit_layers=tuple(reader.get("vit_layers", list)),
            vision=vision,
        )
        if raw.get("head_dim") not in (None, config.head_dim):
            raise ConfigError(
                f"{source}: key 'head_dim' = {raw['head_dim']!r} disagrees with d_model / n_heads = {config.head_dim}"
            )
        for key in ("layer_norm_eps", "rope_theta"):
            if not getattr(config, key) > 0:  # also false for NaN
                raise ConfigError(f"{source}: key '{key}' must be > 0, got {getattr(config, key)!r}")
        if not vision.norm_eps > 0:
            raise ConfigError(f"{source} [vision_backbone]: key 'image_norm_eps' must be > 0, got {vision.norm_eps!r}")
        positive = (
            "d_model",
            "n_heads",
            "n_layers",
            "mlp_ratio",
            "moe_num_experts",
            "max_crops",
            "max_sequence_length",
        )
        for key in positive:
            if getattr(config, key) < 1:
                raise ConfigError(f"{source}: key '{key}' must be >= 1, got {getattr(config, key)!r}")
        if config.d_model % config.n_heads:
            raise ConfigError(f"{source}: d_model {config.d_model} is not divisible by n_heads {config.n_heads}")
        if not 1 <= config.moe_top_k <= config.moe_num_experts:
            raise ConfigError(
                f"{source}: moe_top_k {config.moe_top_k} must be in 1..moe_num_experts ({config.moe_num_experts})"
            )
        if not config.vit_layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in config.vit_layers):
            raise ConfigError(f"{source}: key 'vit_layers' must be a non-empty list of ints, got {raw['vit_layers']!r}")
        for layer in config.vit_layers:
            if not -vision.n_layers <= layer < vision.n_layers:
                raise ConfigError(f"{source}: vit_layers entry {layer} is outside the {vision.n_layers} ViT layers")
        reader.warn_unknown(set(_SUPPORTED) | _IGNORED | {"n_kv_heads", "head_dim", "vision_backbone"})
        return config

    @classmethod
    def from_folder(cls, folder: str | Path) -> MolmoeConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {Path(folder)}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, str(path))


class _Reader:
    """Typed access to a config dict with errors that name the file and the key."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source
        self.read: set[str] = set()

    def get(self, key: str, kind: type) -> Any:
        if key not in self.raw:
            raise ConfigError(f"{self.source}: required key '{key}' is missing")
        value = self.raw[key]
        self.read.add(key)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(f"{self.source}: key '{key}' must be {kind.__name__}, got {value!r}")
        return value

    def expect(self, key: str, supported: Any) -> None:
        if key in self.raw and self.raw[key] != supported:
            raise ConfigError(
                f"{self.source}: key '{key}' = {self.raw[key]!r} is not supported (this implementation needs {supported!r})"
            )

    def warn_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.raw) - known - self.read)
        if unknown:
            log.warning("%s: ignoring unknown keys %s", self.source, ", ".join(unknown))
