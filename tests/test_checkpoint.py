"""Checkpoint folders: the formats that load (pickle-free .bin, safetensors, sharded), conversion, the errors
for broken folders, fingerprints, and the tiny checkpoint builder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmms_adaptive.core.checkpoint import (
    PICKLE,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    SHIPPED_CHECKPOINT,
    CheckpointError,
    build_model,
    convert,
    default_checkpoint,
    fingerprint,
    iter_tensors,
    load_model,
    weight_files,
    write_safetensors,
)
from lmms_adaptive.core.config import MolmoeConfig
from lmms_adaptive.core.model import LayerSchedule, MolmoeForCausalLM
from lmms_adaptive.core.processor import MolmoeProcessor
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig
from lmms_adaptive.default.tiny import IMAGE_TOKENS, build_tiny

PROMPT_IDS = torch.tensor([[0, 17, 250, 3, 99, 480, 12, 7, 301, 44]])


@torch.inference_mode()
def prompt_logits(model: MolmoeForCausalLM) -> torch.Tensor:
    """Logits of a short text prompt: a cheap but complete check that two models hold the same weights."""
    x = model.embed(PROMPT_IDS)
    return model.logits(
        model.decode_layers(x, torch.arange(PROMPT_IDS.shape[1])[None], LayerSchedule.full(model.config))
    )


def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in iter_tensors(folder)}


def bare_folder(src: Path, dst: Path) -> Path:
    """A checkpoint folder with src's config.json and no weights yet."""
    dst.mkdir(parents=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module")
def tiny_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return state_dict(tiny_dir)


@pytest.fixture(scope="module")
def tiny_logits(tiny_dir: Path) -> torch.Tensor:
    return prompt_logits(load_model(tiny_dir))


@pytest.fixture(scope="module")
def bin_dir(tiny_dir: Path, tiny_state: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights as the official release ships them: one torch.save'd state dict, original names."""
    folder = tmp_path_factory.mktemp("tiny_bin")
    for name in ("config.json", "tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(tiny_dir / name, folder / name)
    torch.save(tiny_state, folder / PICKLE)
    return folder


# ----------------------------------------------------------------------------------------------------
# formats that load
# ----------------------------------------------------------------------------------------------------


def test_bin_and_safetensors_give_identical_models(tiny_dir, bin_dir, tiny_logits) -> None:
    assert weight_files(bin_dir) == [bin_dir / PICKLE]
    assert weight_files(tiny_dir) == [tiny_dir / SAFETENSORS]
    from_bin, from_st = load_model(bin_dir), load_model(tiny_dir)
    bin_slots, st_slots = from_bin.weight_slots(), from_st.weight_slots()
    assert bin_slots.keys() == st_slots.keys()
    assert all(torch.equal(bin_slots[n], st_slots[n]) for n in bin_slots)
    assert torch.equal(prompt_logits(from_bin), tiny_logits)
    assert not from_bin.training and not any(p.requires_grad for p in from_bin.parameters())


def test_sharded_safetensors_with_index_loads_identically(tiny_dir, tiny_state, tiny_logits, tmp_path) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "sharded")
    write_safetensors(iter(tiny_state.items()), folder, None, shard_bytes=3 * 1024**2)
    index = json.loads((folder / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (folder / SAFETENSORS).exists()
    assert set(index["weight_map"]) == set(tiny_state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tiny_state.values())
    assert weight_files(folder) == [folder / s for s in shards]
    for shard in shards:  # every tensor sits in the shard the index names
        with safe_open(str(folder / shard), framework="pt") as f:
            assert all(index["weight_map"][n] == shard for n in f.keys())  # noqa: SIM118
    assert torch.equal(prompt_logits(load_model(folder)), tiny_logits)


def test_convert_bin_to_bf16_safetensors(bin_dir, tiny_state, tmp_path) -> None:
    dst = tmp_path / "converted"
    convert(bin_dir, dst)
    assert (dst / SAFETENSORS).is_file() and not (dst / PICKLE).exists()
    for name in ("config.json", "tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (bin_dir / name).read_bytes()
    with safe_open(str(dst / SAFETENSORS), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_tensor(n).dtype for n in list(names)[:50]} == {torch.bfloat16}
    assert names == set(tiny_state)
    bf16 = load_model(dst, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    slots = bf16.weight_slots()
    assert all(torch.equal(slots[n], t.to(torch.bfloat16)) for n, t in tiny_state.items())
    fp32 = load_model(dst)  # bf16 files load into an fp32 model too
    assert fp32.lm_head.weight.dtype == torch.float32
    assert torch.equal(fp32.lm_head.weight, tiny_state["lm_head.weight"].to(torch.bfloat16).float())


def test_convert_sharded_keeping_dtype(bin_dir, tiny_logits, tmp_path) -> None:
    dst = tmp_path / "converted"
    convert(bin_dir, dst, dtype=torch.float32, shard_bytes=4 * 1024**2)
    assert (dst / SAFETENSORS_INDEX).is_file() and len(weight_files(dst)) >= 2
    assert torch.equal(prompt_logits(load_model(dst)), tiny_logits)


def test_convert_refuses_bad_sources(bin_dir, tiny_dir, tiny_state, tmp_path) -> None:
    with pytest.raises(ValueError, match="destination"):
        convert(bin_dir, bin_dir)
    broken = bare_folder(tiny_dir, tmp_path / "broken")
    torch.save({n: t for n, t in tiny_state.items() if n != "lm_head.weight"}, broken / PICKLE)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out" / SAFETENSORS).exists()  # validated before anything is written


# ----------------------------------------------------------------------------------------------------
# broken folders
# ----------------------------------------------------------------------------------------------------


def test_corrupted_safetensors(tiny_dir, tmp_path) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    (folder / SAFETENSORS).write_bytes(b"\x00garbage that is not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match=SAFETENSORS):
        load_model(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999, 7], ids=["half", "last_bytes", "header_only"])
def test_truncated_safetensors(tiny_dir, tmp_path, keep: float) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    data = (tiny_dir / SAFETENSORS).read_bytes()
    (folder / SAFETENSORS).write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match=str(folder / SAFETENSORS)):
        load_model(folder)


def test_truncated_bin(tiny_dir, bin_dir, tmp_path) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    data = (bin_dir / PICKLE).read_bytes()
    (folder / PICKLE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(folder / PICKLE)):
        load_model(folder)


@pytest.mark.parametrize(
    "payload",
    [[torch.zeros(2)], torch.zeros(3), {"state_dict": {"lm_head.weight": torch.zeros(2)}}, {"lm_head.weight": 3}],
    ids=["list", "tensor", "nested_dict", "non_tensor_value"],
)
def test_bin_that_is_not_a_flat_state_dict(tiny_dir, tmp_path, payload) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    torch.save(payload, folder / PICKLE)
    with pytest.raises(CheckpointError, match=str(folder / PICKLE)):
        load_model(folder)


def _touch(path: str) -> None:
    Path(path).write_text("arbitrary code ran while loading a checkpoint")


class Payload:
    """An object whose unpickling runs code: a full unpickle would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


@pytest.mark.parametrize("nested", [False, True])
def test_bin_with_arbitrary_pickled_objects_is_refused(tiny_dir, tmp_path, nested: bool) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    torch.save({"lm_head.weight": torch.zeros(2), "evil": payload} if nested else payload, folder / PICKLE)
    with pytest.raises(CheckpointError, match=str(folder / PICKLE)):
        load_model(folder)
    assert not marker.exists()


def _write_variant(tiny_dir: Path, tiny_state: dict, folder: Path, edit) -> Path:
    bare_folder(tiny_dir, folder)
    state = dict(tiny_state)
    edit(state)
    save_file(state, str(folder / SAFETENSORS))
    return folder


def test_missing_tensor_is_named(tiny_dir, tiny_state, tmp_path) -> None:
    gone = ["model.transformer.blocks.3.mlp.experts.11.up_proj.weight", "model.vision_backbone.pad_embed"]
    folder = _write_variant(tiny_dir, tiny_state, tmp_path / "ckpt", lambda s: [s.pop(n) for n in gone])
    with pytest.raises(CheckpointError, match="missing 2") as err:
        load_model(folder)
    assert all(n in str(err.value) for n in gone) and str(folder) in str(err.value)


def test_unexpected_tensor_is_named(tiny_dir, tiny_state, tmp_path) -> None:
    extra = "model.transformer.blocks.8.attn.att_proj.weight"  # one block too many
    folder = _write_variant(tiny_dir, tiny_state, tmp_path / "ckpt", lambda s: s.update({extra: torch.zeros(3, 4)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.transformer\.blocks\.8\.attn\.att_proj\.weight"):
        load_model(folder)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_dir, tiny_state, tmp_path) -> None:
    name = "model.transformer.blocks.0.mlp.gate.weight"
    expected = list(tiny_state[name].shape)
    folder = _write_variant(tiny_dir, tiny_state, tmp_path / "ckpt", lambda s: s.update({name: torch.zeros(3, 4)}))
    with pytest.raises(CheckpointError, match="mis-shaped 1") as err:
        load_model(folder)
    assert f"{name} (checkpoint [3, 4], config expects {expected})" in str(err.value)


def test_many_problems_are_summarised(tiny_dir, tiny_state, tmp_path) -> None:
    folder = _write_variant(
        tiny_dir, tiny_state, tmp_path / "ckpt", lambda s: [s.pop(n) for n in list(s) if ".experts." in n]
    )
    with pytest.raises(CheckpointError, match=r"missing \d+: .*\(\d+ in all\)"):
        load_model(folder)


def test_wrong_config_for_the_weights(tiny_dir, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["d_model"] = 64
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_model(folder)


def test_missing_weights_file(tiny_dir, tmp_path) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=str(folder)):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="not found"):
        weight_files(tmp_path / "does_not_exist")


def test_index_naming_a_missing_shard(tiny_dir, tiny_state, tmp_path) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "sharded")
    write_safetensors(iter(tiny_state.items()), folder, None, shard_bytes=4 * 1024**2)
    shards = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
    (folder / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]) as err:
        load_model(folder)
    assert SAFETENSORS_INDEX in str(err.value)


def test_malformed_index(tiny_dir, tmp_path) -> None:
    folder = bare_folder(tiny_dir, tmp_path / "ckpt")
    (folder / SAFETENSORS_INDEX).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(folder)
    (folder / SAFETENSORS_INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match=SAFETENSORS_INDEX):
        load_model(folder)


# ----------------------------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_copies_and_tells_models_apart(
    tiny_dir, tiny_dir_seed1, bin_dir, tmp_path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    fp = fingerprint(tiny_dir)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(copy) == fp == fingerprint(tiny_dir)
    assert fingerprint(tiny_dir_seed1) != fp  # same config, other weights
    assert fingerprint(bin_dir) != fp  # same weights, another file format
    raw = json.loads((copy / "config.json").read_text())
    raw["max_crops"] = 6
    (copy / "config.json").write_text(json.dumps(raw))
    assert fingerprint(copy) != fp


# ----------------------------------------------------------------------------------------------------
# the tiny checkpoint builder
# ----------------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_build_is_deterministic(tiny_dir, tiny_dir_seed1, tmp_path) -> None:
    again = _files(build_tiny(tmp_path / "again", seed=0))
    first = _files(tiny_dir)
    assert again.keys() == first.keys()
    assert {"config.json", "tokenizer.json", SAFETENSORS, "preprocessor_config.json"} <= set(first)
    assert all(again[name] == first[name] for name in first), [n for n in first if again[n] != first[n]]
    other = _files(tiny_dir_seed1)
    assert other[SAFETENSORS] != first[SAFETENSORS]
    assert other["tokenizer.json"] == first["tokenizer.json"] and other["config.json"] == first["config.json"]


def test_tiny_checkpoint_is_a_valid_molmoe_folder(tiny_dir, caplog) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    with caplog.at_level("WARNING", logger="lmms_adaptive"):
        config = MolmoeConfig.from_dict(raw)
    assert not caplog.records  # the real schema, nothing unknown
    assert (config.n_layers, config.moe_top_k, config.moe_num_experts) == (8, 8, 16)
    processor = MolmoeProcessor.from_pretrained(tiny_dir)
    special = processor.special
    ids = [special.eos, special.pad, special.im_start, special.im_end, special.im_patch, special.im_col, special.image]
    assert len(set(ids)) == len(ids) and special.bos == special.eos
    assert [processor.tokenizer.id_to_token(i) for i in ids[2:]] == list(IMAGE_TOKENS)
    # every token id the tokenizer can produce has an embedding row and a logit
    assert processor.tokenizer.get_vocab_size() <= config.embedding_size
    assert config.vocab_size + len(IMAGE_TOKENS) == processor.tokenizer.get_vocab_size()
    assert json.loads((tiny_dir / "generation_config.json").read_text())["eos_token_id"] == special.eos


def test_tiny_checkpoint_generates_text(tiny_dir) -> None:
    rt = AdaptiveMolmoe.from_pretrained(tiny_dir, device="cpu")
    assert rt.model_id == fingerprint(tiny_dir)
    assert rt.model.lm_head.weight.dtype == torch.float32
    image = np.random.RandomState(0).randint(0, 256, (96, 128, 3), dtype=np.uint8)
    out = rt.generate(
        "What is in the image?",
        [image],
        rt.knobs.cheapest_plan(),
        GenerationConfig(max_new_tokens=6, stop_at_eos=False),
    )
    assert isinstance(out.text, str) and out.text == rt.processor.decode(out.token_ids).strip() != ""
    assert len(out.token_ids) == 6
    assert out.n_crops >= 2 and out.n_image_tokens > 0 and out.n_prompt_tokens > out.n_image_tokens


def test_shipped_default_is_the_trained_tiny_model_and_loads_strictly() -> None:
    folder = default_checkpoint()
    assert folder == SHIPPED_CHECKPOINT and (folder / SAFETENSORS).is_file()
    config = MolmoeConfig.from_folder(folder)
    assert load_model(folder, "cpu").config == config  # strict: no missing, unexpected or mis-shaped tensor
    assert config.vision.patch_size == 28 and config.n_layers == 8
    rt = AdaptiveMolmoe.from_pretrained(None, device="cpu")
    assert rt.model_id == fingerprint(folder)
    assert len(rt.generate("Hi", None, gen=GenerationConfig(max_new_tokens=2, stop_at_eos=False)).token_ids) == 2


def test_build_model_allocates_directly_in_the_requested_dtype(tiny_dir, monkeypatch) -> None:
    """No full-precision copy first: every tensor is created in bf16 (for the real model, 14 GB not 29 GB + 14 GB)."""
    created = []
    empty_like = torch.empty_like

    def spy(tensor, *args, **kwargs):
        created.append(kwargs.get("dtype", tensor.dtype))
        return empty_like(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "empty_like", spy)
    model = build_model(MolmoeConfig.from_folder(tiny_dir), "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert created and set(created) == {torch.bfloat16}
