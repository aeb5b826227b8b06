"""Hub ids as `pretrained`: resolved through a Hugging Face cache laid out as the hub client lays it out
(built here from the shipped tiny checkpoint, its weights in two shards plus an index), offline; the files an
online download takes; the errors when neither a folder nor the cache has the checkpoint. No network."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from lmms_adaptive.core.checkpoint import (
    SAFETENSORS,
    SAFETENSORS_INDEX,
    SHIPPED_CHECKPOINT,
    iter_tensors,
    resolve_checkpoint,
    weight_files,
    write_safetensors,
)
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig

REPO_ID = "tiny-org/tiny-molmoe-synth"
COMMIT = hashlib.sha1(b"tiny-molmoe-synth").hexdigest()  # noqa: S324 - a commit id, as git names one
# The official allenai/MolmoE-1B-0924 repository (docs: /work/shared/docs/molmoe.md, section 1).
MOLMOE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config_molmoe.py", "modeling_molmoe.py",
    "preprocessing_molmo.py", "image_preprocessing_molmo.py", "molmo_logo.png", "README.md", "pytorch_model.bin",
)  # fmt: skip


def two_shards(src: Path, dst: Path) -> None:
    """src's weights as two safetensors shards plus `model.safetensors.index.json` in dst."""
    sizes = [t.numel() * t.element_size() for _, t in iter_tensors(src)]
    write_safetensors(iter_tensors(src), dst, None, shard_bytes=sum(sizes) // 2 + max(sizes))


def hub_cache(root: Path, repo_id: str, files: Path, commit: str) -> Path:
    """The cache the hub client writes: `models--owner--name/blobs/<hash>` (weights by sha256 as LFS files,
    small files by their git blob sha1), `snapshots/<commit>/<file>` relative symlinks to the blobs, and
    `refs/main` holding the commit. Returns the snapshot folder."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's blob id
        (blobs / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An offline Hugging Face cache holding the shipped tiny model under REPO_ID at COMMIT, sharded.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `huggingface_hub.constants` when imported, so
    the constants are patched (and the environment, for anything imported later)."""
    root = tmp_path_factory.mktemp("hf_cache")
    staging = tmp_path_factory.mktemp("staging")
    for file in SHIPPED_CHECKPOINT.iterdir():
        if file.name != SAFETENSORS:
            shutil.copyfile(file, staging / file.name)
    two_shards(SHIPPED_CHECKPOINT, staging)
    snapshot = hub_cache(root, REPO_ID, staging, COMMIT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(root))
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield snapshot


@pytest.fixture(scope="module")
def hub_rt(hub):
    return AdaptiveMolmoe.from_pretrained(REPO_ID, device="cpu")


def test_the_cache_holds_two_shards_with_an_index(hub):
    assert (hub / SAFETENSORS_INDEX).is_symlink() and not (hub / SAFETENSORS).exists()
    shards = weight_files(hub)
    assert len(shards) == 2 and all(s.is_symlink() for s in shards)


def test_hub_id_resolves_to_the_cached_snapshot_offline(hub):
    assert resolve_checkpoint(REPO_ID) == hub
    assert resolve_checkpoint(REPO_ID, revision=COMMIT) == hub
    assert resolve_checkpoint(REPO_ID, revision="main") == hub
    assert resolve_checkpoint(SHIPPED_CHECKPOINT) == SHIPPED_CHECKPOINT  # a local folder as is
    assert resolve_checkpoint(None) == SHIPPED_CHECKPOINT


def test_hub_id_loads_the_same_model_as_the_folder(hub, hub_rt, rt):
    assert hub_rt.folder == hub
    hub_weights, weights = hub_rt.model.weight_slots(), rt.model.weight_slots()
    assert hub_weights.keys() == weights.keys()
    assert all(torch.equal(hub_weights[name], weights[name]) for name in weights)
    image = Image.new("RGB", (96, 64), "red")
    gen = GenerationConfig(max_new_tokens=4)
    by_id, by_folder = (r.generate("What colour is it?", [image], gen=gen) for r in (hub_rt, rt))
    assert torch.equal(by_id.first_logits, by_folder.first_logits)
    assert by_id.token_ids == by_folder.token_ids and by_id.text == by_folder.text


def test_plugin_takes_a_hub_id_and_revision(hub, tmp_path):
    from lmms_eval.api.instance import Instance

    from lmms_adaptive.integration.lmms_plugin import AdaptiveMolmoeLMM

    def answer(model_args: str):
        lmm = AdaptiveMolmoeLMM.create_from_arg_string(f"{model_args},warmup=false,tier=low,log_dir={tmp_path}")
        lmm.task_dict = {"t": {"test": {0: {"image": Image.new("RGB", (64, 48), "blue")}}}}
        args = ("What colour is it?", {"max_new_tokens": 3}, lambda doc: [doc["image"]], 0, "t", "test")
        request = Instance("generate_until", args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
        return lmm, lmm.generate_until([request])[0]

    lmm, by_id = answer(f"pretrained={REPO_ID},revision={COMMIT}")
    assert lmm.rt.folder == hub
    _, by_folder = answer(f"pretrained={SHIPPED_CHECKPOINT}")
    assert by_id == by_folder


def test_unknown_hub_id_offline_names_the_id_revision_and_cache(hub):
    from lmms_adaptive.integration.lmms_plugin import AdaptiveMolmoeLMM, ModelArgError

    cache = hub_constants.HF_HUB_CACHE
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint("nobody/no-such-model")
    for part in ("hub id nobody/no-such-model", "revision main", f"cache {cache}", "HF_HUB_OFFLINE=1"):
        assert part in str(err.value)
    with pytest.raises(FileNotFoundError, match=f"hub id {REPO_ID} \\(revision v9"):
        resolve_checkpoint(REPO_ID, revision="v9")
    with pytest.raises(ModelArgError, match="pretrained='nobody/no-such-model': checkpoint not found.*cache"):
        AdaptiveMolmoeLMM.create_from_arg_string("pretrained=nobody/no-such-model,warmup=false")


def test_a_missing_local_folder_keeps_its_error(hub, tmp_path):
    for missing in ("/no/such/folder", str(tmp_path / "gone"), "./ckpt/a/b"):
        with pytest.raises(FileNotFoundError, match=f"checkpoint folder not found: {Path(missing)}"):
            resolve_checkpoint(missing)
    with pytest.raises(ValueError, match="revision='main' applies to hub ids only"):
        resolve_checkpoint(SHIPPED_CHECKPOINT, revision="main")
    with pytest.raises(ValueError, match="revision='main' needs a hub id"):
        resolve_checkpoint(None, revision="main")


@pytest.mark.parametrize(
    ("repo_files", "weights"),
    [
        (MOLMOE_FILES, ["pytorch_model.bin"]),
        (
            (*MOLMOE_FILES, SAFETENSORS_INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
            [SAFETENSORS_INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
        ),
    ],
)
def test_online_download_takes_only_what_the_loader_reads(tmp_path, monkeypatch, repo_files, weights):
    """Online, what `snapshot_download` is asked for: the JSON files and the safetensors weights, the pickle only
    when there are none; never the remote-code python files (a stand-in hub serves a listing)."""
    snapshot = tmp_path / "snapshot"

    def download(repo_id, *, revision=None, allow_patterns=None):
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(b"")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_checkpoint("allenai/MolmoE-1B-0924") == snapshot
    fetched = sorted(p.name for p in snapshot.iterdir())
    jsons = [name for name in repo_files if name.endswith(".json") and name != SAFETENSORS_INDEX]
    assert fetched == sorted(jsons + weights)
