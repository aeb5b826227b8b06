"""The native MolmoE model and runtime: golden outputs of the original code, the real config and parameter
names, config validation, the four knobs' semantics, the fast MoE path against the reference loop, and the
request runtime (generation options, stop strings, sampling, timings)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from moe_oracle import reference_experts, reference_moe
from PIL import Image
from safetensors import safe_open

import lmms_adaptive
from lmms_adaptive.core.checkpoint import iter_tensors, load_model, write_safetensors
from lmms_adaptive.core.config import ConfigError, MolmoeConfig
from lmms_adaptive.core.model import (
    Experts,
    KVCache,
    LayerSchedule,
    MoE,
    MolmoeForCausalLM,
    count_parameters,
    experts_grouped,
    experts_indexed,
    experts_one_token,
)
from lmms_adaptive.core.plan import KnobSpace, Plan
from lmms_adaptive.core.processor import MolmoeProcessor
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig

PACKAGED_CONFIG = Path(lmms_adaptive.__file__).parent / "resources" / "molmoe_config.json"
QUESTION = "What is in the image?"


# ----------------------------------------------------------------------------------------------------
# helpers: run the decoder directly with an explicit LayerSchedule
# ----------------------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy(
    model: MolmoeForCausalLM, inputs: dict, schedule: LayerSchedule, n_new: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill + greedy decode with a KV cache (no EOS stop), the runtime's decode step: tokens and the logits
    that chose each one."""
    ids, feats, idx = inputs["ids"], inputs.get("features"), inputs.get("idx")
    n_prompt = ids.shape[1]
    cache = model.new_cache(n_prompt + n_new)
    hidden = model.decode_layers(model.embed(ids, feats, idx), torch.arange(n_prompt)[None], schedule, cache)
    logits = [model.logits(hidden[0, -1]).float()]
    tokens: list[int] = []
    for step in range(n_new):
        tokens.append(int(logits[-1].argmax()))
        if step == n_new - 1:
            break
        logits.append(
            model.decode_token(model.embed(torch.tensor([[tokens[-1]]])), torch.tensor([cache.length]), schedule, cache)
        )
        cache.length += 1
    assert cache.length == n_prompt + n_new - 1
    return tokens, logits


@torch.inference_mode()
def forward_no_cache(
    model: MolmoeForCausalLM, inputs: dict, schedule: LayerSchedule, extra: list[int] = ()
) -> torch.Tensor:
    """Logits [L, vocab] of one full causal forward over the prompt plus `extra` tokens, without a cache."""
    ids = torch.cat([inputs["ids"], torch.tensor([list(extra)], dtype=torch.long)], dim=1)
    x = model.embed(ids, inputs.get("features"), inputs.get("idx"))
    return model.logits(model.decode_layers(x, torch.arange(ids.shape[1])[None], schedule))[0].float()


@torch.inference_mode()
def model_inputs(model: MolmoeForCausalLM, request) -> dict:
    """Token ids and encoded image features of a processed request (the vision stage run once)."""
    out = {"ids": torch.as_tensor(request.input_ids).long()[None]}
    if request.images is not None:
        out["features"] = model.encode_images(torch.as_tensor(request.images), torch.as_tensor(request.image_masks))
        out["idx"] = torch.as_tensor(request.image_input_idx).long()
    return out


def make_image(seed: int = 0, size: tuple[int, int] = (90, 120)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# golden outputs of the original implementation (tiny_a)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_case(golden_dir: Path) -> dict:
    index = json.loads((golden_dir / "index.json").read_text())
    model_case = next(m for m in index["models"] if m["dir"] == "tiny_a")
    pre = next(
        p
        for p in index["preprocess"]
        if p["image"] == model_case["image"] and p["max_crops"] == model_case["max_crops"]
    )
    return {**model_case, "preprocess_file": golden_dir / pre["file"], "folder": golden_dir / "tiny_a"}


@pytest.fixture(scope="module")
def golden_model(golden_case: dict) -> MolmoeForCausalLM:
    model = load_model(golden_case["folder"])
    assert next(model.parameters()).dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def golden_inputs(golden_model: MolmoeForCausalLM, golden_case: dict) -> dict:
    pre = np.load(golden_case["preprocess_file"])
    with torch.inference_mode():
        features = golden_model.encode_images(torch.from_numpy(pre["images"]), torch.from_numpy(pre["image_masks"]))
    return {
        "ids": torch.from_numpy(pre["input_ids"]).long()[None],
        "features": features,
        "idx": torch.from_numpy(pre["image_input_idx"]).long(),
    }


@pytest.fixture(scope="module")
def expected(golden_case: dict) -> dict:
    return dict(np.load(golden_case["folder"] / "expected.npz"))


@pytest.fixture(scope="module")
def real_processor(real_checkpoint_dir: Path) -> MolmoeProcessor:
    return MolmoeProcessor.from_pretrained(real_checkpoint_dir)


def assert_matches_golden(expected: dict, variant: str, tokens: list[int], logits: list[torch.Tensor]) -> None:
    n = len(expected[f"{variant}_greedy_tokens"])
    assert len(tokens) == len(logits) == n
    prefill = logits[0].numpy()
    assert np.abs(prefill - expected[f"{variant}_prefill_last_logits"]).max() <= 1e-4
    assert tokens == expected[f"{variant}_greedy_tokens"].tolist()
    top = torch.stack(logits).topk(5, dim=-1)
    exp_top = expected[f"{variant}_top5"]
    assert (top.indices.numpy() == exp_top[:, 0].astype(np.int64)).all()
    assert np.abs(top.values.numpy() - exp_top[:, 1]).max() <= 1e-4


@pytest.mark.parametrize("reference", [False, True], ids=["fast_moe", "reference_moe"])
@pytest.mark.parametrize(("variant", "top_k"), [("full", 4), ("topk2", 2)])
def test_tiny_a_matches_original_implementation(
    golden_model, golden_inputs, golden_case, expected, variant: str, top_k: int, reference: bool
) -> None:
    schedule = LayerSchedule.full(golden_model.config, top_k)  # every block at this top-k, no renormalisation
    with reference_moe(golden_model) if reference else contextlib.nullcontext():
        tokens, logits = greedy(golden_model, golden_inputs, schedule, golden_case["new_tokens"])
    assert_matches_golden(expected, variant, tokens, logits)


def test_tiny_a_full_plan_through_the_runtime_matches_original(
    golden_model, golden_case, golden_dir, expected, real_processor
) -> None:
    """Processor + full Plan (top-k = the model's k, every block) + runtime loop = the unmodified original model."""
    rt = AdaptiveMolmoe(golden_model, real_processor)
    plan = rt.knobs.full_plan(golden_case["max_crops"])
    assert rt.schedule(plan) == LayerSchedule.full(golden_model.config)
    image = Image.open(golden_dir / golden_case["image"])
    gen = GenerationConfig(max_new_tokens=golden_case["new_tokens"], stop_at_eos=False, keep_step_logits=True)
    out = rt.generate(golden_case["prompt"], [image], plan, gen)
    assert out.stop_reason == "length"
    assert torch.equal(out.first_logits, out.step_logits[0])
    assert_matches_golden(expected, "full", out.token_ids, out.step_logits)


# ----------------------------------------------------------------------------------------------------
# the real config, parameter names and tokenizer
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_meta_model(real_checkpoint_dir: Path) -> MolmoeForCausalLM:
    with torch.device("meta"):
        return MolmoeForCausalLM(MolmoeConfig.from_folder(real_checkpoint_dir))


def test_real_config_builds_the_full_size_model(real_meta_model: MolmoeForCausalLM) -> None:
    assert count_parameters(real_meta_model) == 7_221_875_712
    slots = real_meta_model.weight_slots()
    assert len(slots) == 3_573
    shapes = {
        "model.transformer.wte.embedding": [50304, 2048],
        "model.transformer.wte.new_embedding": [128, 2048],
        "model.transformer.blocks.0.attn.attn_norm.weight": [2048],
        "model.transformer.blocks.0.attn.att_proj.weight": [6144, 2048],
        "model.transformer.blocks.15.attn.q_norm.weight": [2048],
        "model.transformer.blocks.15.attn.k_norm.weight": [2048],
        "model.transformer.blocks.9.attn.attn_out.weight": [2048, 2048],
        "model.transformer.blocks.3.mlp.ff_norm.weight": [2048],
        "model.transformer.blocks.7.mlp.gate.weight": [64, 2048],
        "model.transformer.blocks.0.mlp.experts.0.gate_proj.weight": [1024, 2048],
        "model.transformer.blocks.0.mlp.experts.0.up_proj.weight": [1024, 2048],
        "model.transformer.blocks.15.mlp.experts.63.down_proj.weight": [2048, 1024],
        "model.transformer.ln_f.weight": [2048],
        "lm_head.weight": [50304, 2048],
        "model.vision_backbone.image_vit.class_embedding": [1024],
        "model.vision_backbone.image_vit.positional_embedding": [577, 1024],
        "model.vision_backbone.image_vit.patch_embedding.weight": [1024, 588],
        "model.vision_backbone.image_vit.pre_ln.weight": [1024],
        "model.vision_backbone.image_vit.pre_ln.bias": [1024],
        "model.vision_backbone.image_vit.transformer.resblocks.0.attention.wq.weight": [1024, 1024],
        "model.vision_backbone.image_vit.transformer.resblocks.0.attention.wo.bias": [1024],
        "model.vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w1.weight": [4096, 1024],
        "model.vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w2.weight": [1024, 4096],
        "model.vision_backbone.image_vit.transformer.resblocks.22.attention_norm.bias": [1024],
        "model.vision_backbone.image_vit.transformer.resblocks.22.ffn_norm.weight": [1024],
        "model.vision_backbone.image_pooling_2d.wq.weight": [1024, 2048],
        "model.vision_backbone.image_pooling_2d.wv.bias": [1024],
        "model.vision_backbone.image_pooling_2d.wo.weight": [1024, 1024],
        "model.vision_backbone.image_projector.w1.weight": [1024, 1024],
        "model.vision_backbone.image_projector.w3.weight": [1024, 1024],
        "model.vision_backbone.image_projector.w2.weight": [2048, 1024],
        "model.vision_backbone.pad_embed": [2, 2048],
    }
    for name, shape in shapes.items():
        assert list(slots[name].shape) == shape, name
    for absent in (
        "model.transformer.blocks.16.attn.att_proj.weight",
        "model.transformer.blocks.0.mlp.experts.64.down_proj.weight",
        "model.vision_backbone.image_vit.transformer.resblocks.23.feed_forward.w1.weight",
        "model.transformer.blocks.0.mlp.experts.gate_up",  # the stacked storage is not a checkpoint name
        "model.transformer.blocks.0.mlp.experts.down",
    ):
        assert absent not in slots
    # 16 blocks x 64 experts x 3 matrices, and nothing else per expert
    assert sum(1 for n in slots if ".mlp.experts." in n) == 16 * 64 * 3
    assert sum(1 for n in slots if n.startswith("model.vision_backbone.image_vit.transformer.resblocks.")) == 23 * 16


def test_tiny_a_checkpoint_names_equal_weight_slots(golden_case: dict) -> None:
    folder = golden_case["folder"]
    with torch.device("meta"):
        slots = MolmoeForCausalLM(MolmoeConfig.from_folder(folder)).weight_slots()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert set(stored) == set(slots)
    assert stored == {name: list(t.shape) for name, t in slots.items()}


def test_expert_slots_are_views_of_the_stacked_tensors(tiny_dir: Path) -> None:
    """The checkpoint's [out, in] expert matrices are views of the output-major stacks."""
    model = load_model(tiny_dir)
    slots = model.weight_slots()
    experts = model.model.transformer.blocks[2].mlp.experts
    hidden = experts.hidden
    with torch.no_grad():
        slots["model.transformer.blocks.2.mlp.experts.5.gate_proj.weight"].fill_(1.5)
        slots["model.transformer.blocks.2.mlp.experts.5.up_proj.weight"].fill_(2.5)
        slots["model.transformer.blocks.2.mlp.experts.5.down_proj.weight"].fill_(3.5)
    assert (experts.gate_up[5, :hidden] == 1.5).all() and (experts.gate_up[5, hidden:] == 2.5).all()
    assert (experts.down[5] == 3.5).all()
    assert not (experts.gate_up[4] == 1.5).all() and not (experts.down[6] == 3.5).all()


def test_real_tokenizer_special_ids(real_processor: MolmoeProcessor) -> None:
    special = real_processor.special
    assert (special.bos, special.eos, special.pad) == (50279, 50279, 1)
    assert (special.im_start, special.im_end, special.im_patch, special.im_col, special.image) == (
        50280, 50281, 50282, 50283, 50284,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# config validation
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def raw_config() -> dict:
    """A fresh copy of the official config.json (the packaged copy; equal to the shared one)."""
    return json.loads(PACKAGED_CONFIG.read_text())


def _set(raw: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for p in parents:
        raw = raw[p]
    raw[key] = value


def _delete(raw: dict, dotted: str) -> None:
    *parents, key = dotted.split(".")
    for p in parents:
        raw = raw[p]
    del raw[key]


def test_real_config_is_fully_understood(real_checkpoint_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lmms_adaptive"):
        config = MolmoeConfig.from_folder(real_checkpoint_dir)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert (config.d_model, config.n_heads, config.n_layers, config.head_dim) == (2048, 16, 16, 128)
    assert (config.moe_num_experts, config.moe_top_k, config.expert_hidden) == (64, 8, 1024)
    assert (config.vocab_size, config.embedding_size, config.additional_vocab_size) == (50280, 50304, 128)
    assert (config.layer_norm_eps, config.rope_theta, config.max_crops) == (1e-5, 10000.0, 12)
    assert config.vit_layers == (-2, -9) and config.image_feature_dim == 2048
    v = config.vision
    assert (v.width, v.head_dim, v.n_heads, v.mlp_dim, v.n_layers, v.n_positions, v.patch_size, v.patch_dim) == (
        1024, 64, 16, 4096, 23, 577, 14, 588,
    )  # fmt: skip


def test_unknown_keys_are_logged(raw_config: dict, caplog: pytest.LogCaptureFixture) -> None:
    raw_config["brand_new_option"] = 1
    raw_config["vision_backbone"]["another_new_option"] = 2
    with caplog.at_level(logging.WARNING, logger="lmms_adaptive"):
        MolmoeConfig.from_dict(raw_config)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "brand_new_option" in text and "another_new_option" in text


@pytest.mark.parametrize(
    "key", ["d_model", "n_layers", "moe_top_k", "vit_layers", "vision_backbone", "vision_backbone.image_num_layers",
            "vision_backbone.image_emb_dim"]
)  # fmt: skip
def test_missing_required_key(raw_config: dict, key: str) -> None:
    _delete(raw_config, key)
    with pytest.raises(ConfigError, match=rf"'{key.split('.')[-1]}' is missing"):
        MolmoeConfig.from_dict(raw_config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("block_type", "sequential"),
        ("activation_type", "gelu"),
        ("layer_norm_type", "default"),
        ("weight_tying", True),
        ("moe_shared_expert", True),
        ("crop_mode", "resize"),
        ("vision_backbone.image_model_type", "siglip"),
        ("vision_backbone.image_mlp_activations", "gelu"),
    ],
)
def test_unsupported_value(raw_config: dict, key: str, value) -> None:
    _set(raw_config, key, value)
    with pytest.raises(ConfigError) as err:
        MolmoeConfig.from_dict(raw_config)
    message = str(err.value)
    assert key.split(".")[-1] in message and repr(value) in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("d_model", "2048"),
        ("d_model", 2048.0),
        ("d_model", True),
        ("n_layers", None),
        ("layer_norm_eps", "1e-5"),
        ("rope_theta", False),
        ("vit_layers", "-2,-9"),
        ("vit_layers", ["-2", "-9"]),
        ("vision_backbone", [1024]),
        ("vision_backbone.image_emb_dim", 1024.5),
        ("vision_backbone.image_norm_eps", "1e-5"),
    ],
)
def test_wrong_type_names_the_key(raw_config: dict, key: str, value) -> None:
    _set(raw_config, key, value)
    with pytest.raises(ConfigError, match=re.escape(key.split(".")[-1])):
        MolmoeConfig.from_dict(raw_config)


def test_int_is_accepted_for_a_float_key(raw_config: dict) -> None:
    raw_config["rope_theta"] = 500000
    raw_config["layer_norm_eps"] = 1
    config = MolmoeConfig.from_dict(raw_config)
    assert config.rope_theta == 500000.0 and isinstance(config.rope_theta, float)
    assert config.layer_norm_eps == 1.0 and isinstance(config.layer_norm_eps, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [("n_kv_heads", 4), ("head_dim", 64), ("moe_top_k", 65), ("moe_top_k", 0), ("vit_layers", [-2, -30]), ("vit_layers", []),
     ("n_heads", 15), ("vision_backbone.image_num_key_value_heads", 8)],
)  # fmt: skip
def test_inconsistent_values(raw_config: dict, key: str, value) -> None:
    _set(raw_config, key, value)
    with pytest.raises(ConfigError, match=re.escape(key.split(".")[-1])):
        MolmoeConfig.from_dict(raw_config)


def test_config_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        MolmoeConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        MolmoeConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        MolmoeConfig.from_folder(tmp_path)


# ----------------------------------------------------------------------------------------------------
# MoE: fast paths against the reference loop, renormalisation
# ----------------------------------------------------------------------------------------------------


def _random_experts(n_experts: int = 16, d_model: int = 48, hidden: int = 32, seed: int = 0) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(n_experts, d_model, hidden)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=gen) / d_model**0.5)
        experts.down.copy_(torch.randn(experts.down.shape, generator=gen) / hidden**0.5)
    return experts


def _routing(n_tokens: int, n_experts: int, top_k: int, d_model: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d_model, generator=gen)
    probs = torch.softmax(torch.randn(n_tokens, n_experts, generator=gen) * 2, dim=-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    return x, weights, chosen


@pytest.mark.parametrize(
    ("n_tokens", "top_k"),
    [(1, 1), (1, 2), (1, 8), (1, 16),  # one token: the loop over its chosen experts (or its traceable form)
     (2, 8), (4, 4), (3, 8), (40, 1), (40, 3), (40, 8), (40, 16), (200, 2)],  # grouped (some experts idle)
)  # fmt: skip
def test_fast_moe_paths_equal_reference(n_tokens: int, top_k: int) -> None:
    experts = _random_experts()
    x, weights, chosen = _routing(n_tokens, 16, top_k, 48, seed=n_tokens * 100 + top_k)
    with torch.no_grad():
        ref = reference_experts(experts, x, weights, chosen)
        assert ref.abs().max() > 0.1  # a non-trivial output
        paths = [experts_grouped] + ([experts_one_token, experts_indexed] if n_tokens == 1 else [])
        for path in paths:
            torch.testing.assert_close(
                path(x, weights, chosen, experts.gate_up, experts.down), ref, atol=1e-5, rtol=1e-5
            )
        # the dispatch: a loop over the chosen experts for one token, grouped by expert for more
        branch = experts_one_token if n_tokens == 1 else experts_grouped
        assert torch.equal(experts(x, weights, chosen), branch(x, weights, chosen, experts.gate_up, experts.down))


def test_grouped_branch_with_all_tokens_on_one_expert() -> None:
    experts = _random_experts()
    x, weights, _ = _routing(30, 16, 2, 48, seed=3)
    chosen = torch.tensor([[7, 2]] * 30)
    with torch.no_grad():
        torch.testing.assert_close(
            experts(x, weights, chosen), reference_experts(experts, x, weights, chosen), atol=1e-5, rtol=1e-5
        )


def _random_moe(config: MolmoeConfig, seed: int = 0) -> MoE:
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        moe.ff_norm.weight.fill_(1.0)
    return moe


@pytest.fixture(scope="module")
def tiny_config(tiny_dir: Path) -> MolmoeConfig:
    return MolmoeConfig.from_folder(tiny_dir)


def test_renormalize_divides_each_token_by_its_top_k_mass(tiny_config: MolmoeConfig) -> None:
    moe = _random_moe(tiny_config)
    x = torch.randn(1, 24, tiny_config.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = torch.softmax(moe.gate(moe.ff_norm(x)).float(), dim=-1)
        for top_k in (1, 3, 8):
            mass = probs.topk(top_k, dim=-1).values.sum(-1, keepdim=True)
            plain, renorm = moe(x, top_k, False), moe(x, top_k, True)
            assert (renorm - plain).abs().max() > 1e-2  # top_k < experts: renormalising changes the output
            torch.testing.assert_close(renorm, plain / mass, atol=1e-5, rtol=1e-4)


def test_renormalize_is_a_no_op_when_every_expert_is_used(tiny_config: MolmoeConfig) -> None:
    moe = _random_moe(tiny_config)
    x = torch.randn(1, 24, tiny_config.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            moe(x, tiny_config.moe_num_experts, True), moe(x, tiny_config.moe_num_experts, False), atol=1e-6, rtol=1e-5
        )


def test_top1_renormalized_is_the_chosen_expert_alone(tiny_config: MolmoeConfig) -> None:
    moe = _random_moe(tiny_config)
    x = torch.randn(1, 6, tiny_config.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = moe.ff_norm(x)[0]
        best = moe.gate(h).argmax(-1)
        ex = moe.experts
        expected = torch.stack(
            [
                (torch.nn.functional.silu(ex.gate_up[e, : ex.hidden] @ t) * (ex.gate_up[e, ex.hidden :] @ t))
                @ ex.down[e].T
                for t, e in zip(h, best.tolist(), strict=True)
            ]
        )
        torch.testing.assert_close(moe(x, 1, True)[0], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# knob semantics on the tiny model
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> MolmoeForCausalLM:
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def tiny_processor(tiny_dir: Path) -> MolmoeProcessor:
    return MolmoeProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tiny_inputs(tiny_model, tiny_processor) -> dict:
    return model_inputs(tiny_model, tiny_processor(QUESTION, [make_image()], max_crops=3))


def _without_block(src: Path, dst: Path, removed: int) -> Path:
    """A checkpoint with block `removed` deleted: n_layers - 1, later blocks renumbered."""
    raw = json.loads((src / "config.json").read_text())
    raw["n_layers"] -= 1
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(raw))
    pattern = re.compile(r"^model\.transformer\.blocks\.(\d+)\.")

    def renamed():
        for name, tensor in iter_tensors(src):
            m = pattern.match(name)
            if m is None:
                yield name, tensor
            elif int(m[1]) != removed:
                i = int(m[1])
                yield f"model.transformer.blocks.{i - (i > removed)}." + name[m.end() :], tensor

    write_safetensors(renamed(), dst, None)
    return dst


@pytest.mark.parametrize("removed", [0, 3, 7])
def test_skipping_a_block_equals_removing_it(tiny_dir, tiny_model, tiny_inputs, tmp_path, removed: int) -> None:
    small = load_model(_without_block(tiny_dir, tmp_path / "small", removed))
    assert small.config.n_layers == tiny_model.config.n_layers - 1
    k = tiny_model.config.moe_top_k
    skipping = LayerSchedule(tuple((i, k) for i in range(tiny_model.config.n_layers) if i != removed))
    tokens_skip, logits_skip = greedy(tiny_model, tiny_inputs, skipping, 4)
    tokens_small, logits_small = greedy(small, tiny_inputs, LayerSchedule.full(small.config), 4)
    assert tokens_skip == tokens_small
    for a, b in zip(logits_skip, logits_small, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # ... and skipping really changes the model
    full_logits = greedy(tiny_model, tiny_inputs, LayerSchedule.full(tiny_model.config), 1)[1][0]
    assert (full_logits - logits_skip[0]).abs().max() > 1e-3


def test_full_top_k_plan_equals_the_unmodified_model(tiny_model, tiny_inputs) -> None:
    knobs = KnobSpace.from_config(tiny_model.config)
    unmodified = forward_no_cache(tiny_model, tiny_inputs, LayerSchedule.full(tiny_model.config))
    for p in knobs.insert_positions:
        plan = Plan(max_crops=3, top_k=knobs.model_top_k, n_blocks=knobs.n_layers, insert_pos=p)
        schedule = knobs.schedule(plan)
        assert schedule == LayerSchedule.full(tiny_model.config)
        assert torch.equal(forward_no_cache(tiny_model, tiny_inputs, schedule), unmodified)
    reduced = forward_no_cache(tiny_model, tiny_inputs, knobs.schedule(Plan(3, knobs.top_k_options[0], knobs.n_layers)))
    assert (reduced - unmodified).abs().max() > 1e-3  # a lower top-k is a real change


class _Recorder:
    """How often each block runs, on how many tokens, with which top-k: forward pre-hooks on every block's MoE
    (prefill) and a spy around the runtime's decode step, which gets the block's weights (decode)."""

    def __init__(self, model: MolmoeForCausalLM, rt: AdaptiveMolmoe) -> None:
        self.calls: dict[int, list[tuple[int, int]]] = {i: [] for i in range(model.config.n_layers)}
        self.handles = [
            block.mlp.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, block in enumerate(model.model.transformer.blocks)
        ]
        index_of = {block.mlp.experts.gate_up.data_ptr(): i for i, block in enumerate(model.model.transformer.blocks)}
        step = rt.decode_step

        def spy(x, w, *args):
            self.calls[index_of[w.gate_up.data_ptr()]].append((x.shape[1], args[5]))
            return step(x, w, *args)

        rt.decode_step = spy

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            top_k = args[1] if len(args) > 1 else kwargs["top_k"]
            self.calls[index].append((args[0].shape[1], top_k))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    ("plan", "drop_order"),
    [
        (Plan(max_crops=3, top_k=5, n_blocks=6, insert_pos=1), None),
        (Plan(max_crops=3, top_k=4, n_blocks=6, insert_pos=1), (2, 4, 0, 1, 3, 5, 6, 7)),
        (Plan(max_crops=3, top_k=6, n_blocks=7, insert_pos=2), (0, 1, 5, 2, 3, 4, 6, 7)),
    ],
)
def test_plan_applies_at_prefill_and_every_decode_step(
    tiny_model, tiny_processor, monkeypatch, plan, drop_order
) -> None:
    rt = AdaptiveMolmoe(tiny_model, tiny_processor, drop_order=drop_order)
    schedule = rt.schedule(plan)
    active = set(schedule.blocks)
    assert len(active) == plan.n_blocks < tiny_model.config.n_layers
    caches = []
    original_new_cache = tiny_model.new_cache

    def spy_new_cache(*args, **kwargs):
        caches.append(original_new_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(tiny_model, "new_cache", spy_new_cache)
    request = tiny_processor(QUESTION, [make_image()], max_crops=plan.max_crops)
    recorder = _Recorder(tiny_model, rt)
    try:
        gen = GenerationConfig(max_new_tokens=6, stop_at_eos=False, keep_step_logits=True)
        out = rt.run(request, plan, gen)
    finally:
        recorder.remove()
    n_prompt = len(request.input_ids)
    assert out.n_prompt_tokens == n_prompt and len(out.token_ids) == 6

    # each active block ran once at prefill and once per decode step, at its scheduled top-k; the others never
    k_of = dict(schedule.layers)
    for i, calls in recorder.calls.items():
        if i in active:
            assert calls == [(n_prompt, k_of[i])] + [(1, k_of[i])] * len(out.timings.decode_ms)
        else:
            assert calls == []
    assert {k for i, k in schedule.layers if i >= plan.insert_pos} == {plan.top_k}

    # the KV cache holds entries for the active blocks only
    (cache,) = caches
    assert set(cache.k) == set(cache.v) == active
    assert cache.length == n_prompt + len(out.token_ids) - 1

    # cached step-by-step decoding = a full no-cache forward over prompt + generated tokens, same schedule
    inputs = model_inputs(tiny_model, request)
    reference = forward_no_cache(tiny_model, inputs, schedule, out.token_ids[:-1])
    assert len(out.step_logits) == len(out.token_ids)
    for t, step in enumerate(out.step_logits):
        torch.testing.assert_close(step, reference[n_prompt - 1 + t], atol=1e-5, rtol=1e-4)
        assert out.token_ids[t] == int(reference[n_prompt - 1 + t].argmax())
    full = forward_no_cache(tiny_model, inputs, LayerSchedule.full(tiny_model.config), out.token_ids[:-1])
    assert (full[n_prompt - 1 :] - reference[n_prompt - 1 :]).abs().max() > 1e-3


def test_renormalize_in_the_model(tiny_model, tiny_inputs) -> None:
    config = tiny_model.config
    every = config.moe_num_experts
    plain = forward_no_cache(tiny_model, tiny_inputs, LayerSchedule.full(config, every))
    renorm = forward_no_cache(tiny_model, tiny_inputs, LayerSchedule(LayerSchedule.full(config, every).layers, True))
    torch.testing.assert_close(renorm, plain, atol=1e-5, rtol=1e-5)  # weights of all experts already sum to 1
    plain4 = forward_no_cache(tiny_model, tiny_inputs, LayerSchedule.full(config, 4))
    renorm4 = forward_no_cache(tiny_model, tiny_inputs, LayerSchedule(LayerSchedule.full(config, 4).layers, True))
    assert (renorm4 - plain4).abs().max() > 1e-3
    # the Plan's renormalize flag reaches the schedule
    knobs = KnobSpace.from_config(config)
    assert knobs.schedule(Plan(3, 4, knobs.n_layers, renormalize=True)).renormalize is True


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_model_fast_moe_equals_reference_moe(tiny_model, tiny_inputs, top_k: int) -> None:
    schedule = LayerSchedule(tuple((i, top_k) for i in range(tiny_model.config.n_layers) if i != 5))
    fast = greedy(tiny_model, tiny_inputs, schedule, 3)  # prefill: grouped; decode: gathered (k <= 16 experts)
    with reference_moe(tiny_model):
        ref = greedy(tiny_model, tiny_inputs, schedule, 3)
    assert all("forward" not in vars(b.mlp.experts) for b in tiny_model.model.transformer.blocks)  # restored
    assert fast[0] == ref[0]
    for a, b in zip(fast[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# the runtime
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt(tiny_model, tiny_processor) -> AdaptiveMolmoe:
    return AdaptiveMolmoe(tiny_model, tiny_processor)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ],
)
def test_generation_config_validation(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        GenerationConfig(**kwargs)


def test_generation_config_defaults_are_greedy() -> None:
    gen = GenerationConfig()
    assert not gen.do_sample and gen.stop_at_eos and gen.max_new_tokens >= 1
    GenerationConfig(do_sample=True, temperature=0.7, top_p=1.0)  # valid sampling settings are accepted


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_and_timings(rt: AdaptiveMolmoe, n: int) -> None:
    out = rt.generate(
        QUESTION,
        [make_image()],
        Plan(3, 6, 7),
        GenerationConfig(max_new_tokens=n, stop_at_eos=False, keep_step_logits=True),
    )
    assert len(out.token_ids) == n and out.stop_reason == "length"
    t = out.timings
    assert len(t.decode_ms) == n - 1 == len(out.step_logits) - 1  # one entry per decode forward
    assert all(ms >= 0 for ms in t.decode_ms) and t.vision_ms >= 0 and t.prefill_ms >= 0 and t.preprocess_ms >= 0
    assert t.total_ms >= t.preprocess_ms + t.vision_ms + t.prefill_ms + sum(t.decode_ms)
    assert out.text == rt.processor.decode(out.token_ids).strip()
    assert out.plan == Plan(3, 6, 7)


def test_stop_strings_cut_the_text(rt: AdaptiveMolmoe) -> None:
    # seeded sampling: varied text from the random tiny model (greedy decoding repeats one token)
    gen = GenerationConfig(max_new_tokens=12, stop_at_eos=False, do_sample=True, seed=1)
    image = make_image(5)
    free = rt.generate(QUESTION, [image], gen=gen)
    decode = rt.processor.decode
    full_text = decode(free.token_ids)
    # a stop string: the text of a later generated token that does not occur before it
    for j in range(2, len(free.token_ids)):
        before, upto = decode(free.token_ids[:j]), decode(free.token_ids[: j + 1])
        stop = upto[len(before) :]
        if upto.startswith(before) and stop.strip() and "\ufffd" not in stop and stop not in before:
            break
    else:
        pytest.fail(f"no usable stop string in the generated text {full_text!r}")
    cut = full_text.find(stop)
    assert cut > 0
    out = rt.generate(QUESTION, [image], gen=dataclasses.replace(gen, stop=("never-generated-xyz", stop)))
    assert out.stop_reason == "stop"
    assert out.text == full_text[:cut].strip() != ""
    assert stop not in out.text
    assert 1 <= len(out.token_ids) <= j + 1 < len(free.token_ids)
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    # a stop string that never appears changes nothing
    none = rt.generate(QUESTION, [image], gen=dataclasses.replace(gen, stop=("never-generated-xyz",)))
    assert none.stop_reason == "length" and none.token_ids == free.token_ids and none.text == full_text.strip()


def test_eos_stops_generation(rt: AdaptiveMolmoe) -> None:
    free = rt.generate(QUESTION, [make_image()], gen=GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    processor = copy.copy(rt.processor)
    processor.special = dataclasses.replace(processor.special, eos=free.token_ids[0])  # pretend it was EOS
    eos_rt = AdaptiveMolmoe(rt.model, processor)
    out = eos_rt.generate(QUESTION, [make_image()], gen=GenerationConfig(max_new_tokens=3))
    assert out.stop_reason == "eos" and out.token_ids == [] and out.text == ""
    kept = eos_rt.generate(QUESTION, [make_image()], gen=GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    assert kept.token_ids == free.token_ids


def test_sampling_is_reproducible_with_a_seed(rt: AdaptiveMolmoe) -> None:
    def sample(seed: int, **kwargs) -> list[int]:
        gen = GenerationConfig(
            max_new_tokens=10, do_sample=True, temperature=2.0, seed=seed, stop_at_eos=False, **kwargs
        )
        return rt.generate(QUESTION, [make_image()], Plan(3, 5, 8), gen).token_ids

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first  # near-uniform logits: two seeds do not draw the same 10 tokens
    greedy_tokens = rt.generate(
        QUESTION, [make_image()], Plan(3, 5, 8), GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    ).token_ids
    assert sample(7, top_p=1e-6) == greedy_tokens  # a nucleus of one token is greedy decoding


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((40, 50, 3), dtype=np.float32), ValueError, "uint8"),
        (np.zeros((40, 50), dtype=np.uint8), ValueError, "shape"),
        (np.zeros((40, 50, 4), dtype=np.uint8), ValueError, "shape"),
        ("photo.jpg", TypeError, "str"),
    ],
    ids=["float", "2d", "rgba_array", "string"],
)
def test_bad_images_give_clear_errors(rt: AdaptiveMolmoe, image, error, match: str) -> None:
    with pytest.raises(error, match=match):
        rt.generate(QUESTION, [image], gen=GenerationConfig(max_new_tokens=2))


def test_text_only_request(rt: AdaptiveMolmoe) -> None:
    out = rt.generate(QUESTION, None, Plan(3, 8, 8), GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    assert out.n_crops == 0 and out.n_image_tokens == 0
    assert out.n_prompt_tokens == 1 + len(rt.processor.encode_text(" User: " + QUESTION + " Assistant:"))
    assert len(out.token_ids) == 3


def test_invalid_plan_is_refused_by_the_runtime(rt: AdaptiveMolmoe) -> None:
    with pytest.raises(ValueError, match="n_blocks"):
        rt.generate(QUESTION, [make_image()], Plan(3, 8, 3))
    with pytest.raises(ValueError, match="top_k"):
        rt.generate(QUESTION, [make_image()], Plan(3, 9, 8))


def test_decode_token_attends_only_up_to_its_position(tiny_model, tiny_inputs) -> None:
    """The static-shape decode step sees the whole cache buffer; garbage after its position must not matter."""
    schedule = LayerSchedule.full(tiny_model.config)
    tokens, logits = greedy(tiny_model, tiny_inputs, schedule, 4)
    n_prompt = tiny_inputs["ids"].shape[1]
    with torch.inference_mode():
        cache = tiny_model.new_cache(n_prompt + 4)
        tiny_model.decode_layers(
            tiny_model.embed(tiny_inputs["ids"], tiny_inputs["features"], tiny_inputs["idx"]),
            torch.arange(n_prompt)[None],
            schedule,
            cache,
        )
        for block in cache.k:  # fill every slot after the prompt with noise
            cache.k[block][:, :, n_prompt:] = torch.randn_like(cache.k[block][:, :, n_prompt:]) * 100
            cache.v[block][:, :, n_prompt:] = torch.randn_like(cache.v[block][:, :, n_prompt:]) * 100
        step = tiny_model.decode_token(
            tiny_model.embed(torch.tensor([[tokens[0]]])), torch.tensor([n_prompt]), schedule, cache
        )
    torch.testing.assert_close(step, logits[1], rtol=0, atol=1e-5)


def test_cache_capacity_rounds_up_to_its_bucket(tiny_model) -> None:
    cache = tiny_model.new_cache(KVCache.BUCKET + 1)
    assert cache.max_len == 2 * KVCache.BUCKET and tiny_model.new_cache(KVCache.BUCKET).max_len == KVCache.BUCKET


def test_a_decode_token_attends_to_the_bucket_it_is_in_not_the_capacity(tiny_model) -> None:
    bucket = KVCache.BUCKET
    cache = tiny_model.new_cache(3 * bucket)
    for length, slots in ((0, bucket), (5, bucket), (bucket - 1, bucket), (bucket, 2 * bucket)):
        cache.length = length
        (keys, values), mask = cache.decode_window(0), cache.decode_mask(torch.tensor([length]))
        assert keys.shape[2] == values.shape[2] == slots and mask.shape == (1, 1, 1, slots)
        assert mask[0, 0, 0].tolist() == [i <= length for i in range(slots)]
