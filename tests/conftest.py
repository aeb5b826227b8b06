"""Shared fixtures: the shared test data folder, tiny random MolmoE checkpoints built once per session,
and an offline lmms-eval environment.

Torch runs on one CPU thread: the models here are tiny, and several OpenMP threads spin-waiting on a
busy small machine make them tens of times slower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def single_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared test data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def real_checkpoint_dir(shared_dir: Path) -> Path:
    """The real MolmoE-1B-0924 config and tokenizer files (no weights)."""
    folder = shared_dir / "molmoe-1b-0924"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        pytest.skip(f"real MolmoE-1B-0924 config/tokenizer not found in {folder}")
    return folder


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    folder = shared_dir / "golden"
    if not (folder / "index.json").is_file():
        pytest.skip(f"golden outputs of the original implementation not found in {folder}")
    return folder


@pytest.fixture(scope="session")
def rt():
    """The built-in model (the shipped tiny MolmoE) on the CPU. Treat as read-only."""
    from lmms_adaptive.core.runtime import AdaptiveMolmoe

    return AdaptiveMolmoe.from_pretrained(None, device="cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MolmoE checkpoint folder (seed 0). Treat as read-only: copy it to modify it."""
    from lmms_adaptive.default.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_seed0"), seed=0)


@pytest.fixture(scope="session")
def tiny_dir_seed1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmms_adaptive.default.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_seed1"), seed=1)


@pytest.fixture(scope="session")
def lmms_env(tmp_path_factory: pytest.TempPathFactory):
    """lmms-eval offline: HF offline env vars, a scratch HF cache, and a scratch cwd (textvqa's aggregation
    writes ``submissions/`` into the cwd)."""
    scratch = tmp_path_factory.mktemp("lmms_env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(scratch / "hf_home"))
        mp.setenv("HF_DATASETS_CACHE", str(scratch / "hf_home" / "datasets"))
        mp.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
        cwd = scratch / "cwd"
        cwd.mkdir()
        mp.chdir(cwd)
        yield cwd


@pytest.fixture(scope="session", autouse=True)
def private_digest_cache(tmp_path_factory: pytest.TempPathFactory):
    """Checkpoint fingerprints cache file digests under $LMMS_ADAPTIVE_CACHE: a scratch one for the tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMMS_ADAPTIVE_CACHE", str(tmp_path_factory.mktemp("digest_cache")))
        yield
