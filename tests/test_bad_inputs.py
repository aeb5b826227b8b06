"""Bad input, as a hostile user gives it: every case is a clear error naming what is wrong, or a documented
graceful behaviour. Images, prompts, knobs, budgets, model_args, checkpoints, artifacts, run folders."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_records import make_record
from PIL import Image, ImageOps

from lmms_adaptive.controllers import controller_from_file, load_controller
from lmms_adaptive.controllers.base import ArtifactError
from lmms_adaptive.controllers.static import static_artifact
from lmms_adaptive.core.checkpoint import CheckpointError, fingerprint, load_model
from lmms_adaptive.core.config import ConfigError
from lmms_adaptive.core.plan import Plan
from lmms_adaptive.core.processor import image_size, to_rgb_array
from lmms_adaptive.core.runtime import AdaptiveMolmoe, GenerationConfig
from lmms_adaptive.serving.records import RecordWriter, read_records
from lmms_adaptive.serving.request import Request
from lmms_adaptive.tools import profile
from lmms_adaptive.tools.runlog import FolderInUse

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What color is the square?"


def red_square(width: int = 320, height: int = 240) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    image.paste((220, 20, 20), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


@pytest.fixture(scope="module")
def lmm_class(lmms_env):
    from lmms_adaptive.integration.lmms_plugin import AdaptiveMolmoeLMM

    return AdaptiveMolmoeLMM


def make_lmm(lmm_class, args: str):
    return lmm_class.create_from_arg_string(args if "warmup=" in args else args + ",warmup=false", {"batch_size": 1})


def instance(kind: str, args: tuple, doc_id: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, idx=doc_id, metadata={"task": args[4], "doc_id": doc_id, "repeats": 1})


# -- knobs, budgets and model_args --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_k": 4.5}, "plan.top_k must be an integer, got 4.5"),
        ({"top_k": "4"}, "plan.top_k must be an integer, got '4'"),
        ({"n_blocks": True}, "plan.n_blocks must be an integer, got True"),
        ({"renormalize": "no"}, "plan.renormalize must be true or false, got 'no'"),
    ],
)
def test_plan_fields_have_their_types(fields: dict, message: str) -> None:
    with pytest.raises(TypeError) as err:
        Plan(**{"max_crops": 3, "top_k": 4, "n_blocks": 6, **fields})
    assert message in str(err.value)


@pytest.mark.parametrize("budget", [math.nan, math.inf, 0.0, -5.0, True])
def test_request_budgets_are_finite_and_positive(budget) -> None:
    with pytest.raises(ValueError, match="budget_ms must be a finite number of milliseconds > 0"):
        Request(QUESTION, budget_ms=budget)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("budget=nan", "budget must be a finite positive number"),
        ("budget=inf", "budget must be a finite positive number"),
        ("renormalize=no", "renormalize must be true or false (or 1 / 0), got 'no'"),
        ("renormalize=2", "renormalize must be true or false (or 1 / 0), got 2"),
        ("warmup=maybe", "warmup must be true or false"),
    ],
)
def test_model_args_refuse_nan_budgets_and_non_booleans(lmm_class, args: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make_lmm(lmm_class, args)
    assert message in str(err.value)


def test_boolean_model_args_take_one_and_zero(lmm_class) -> None:
    assert make_lmm(lmm_class, "renormalize=1,tier=low").controller.plan.renormalize is True
    assert make_lmm(lmm_class, "renormalize=false,tier=low").controller.plan.renormalize is False


def test_records_are_strict_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        make_record(total_ms=math.nan).to_json()


# -- prompts ------------------------------------------------------------------------------------------


def test_text_that_spells_special_tokens_stays_text(rt: AdaptiveMolmoe) -> None:
    special = rt.processor.special
    controls = {special.bos, special.eos, special.pad, special.im_start, special.im_end, special.im_patch,
                special.im_col, special.image}  # fmt: skip
    question = "What is <im_patch><im_patch> <|endoftext|> <im_start><|image|><im_col><im_end> <|padding|>?"
    assert not set(rt.processor.encode_text(question)) & controls
    request = rt.processor(question * 10, [red_square()], max_crops=3)
    patches = int((request.input_ids == special.im_patch).sum())
    assert patches == int((request.image_input_idx >= 0).sum())  # one <im_patch> per image feature slot


def test_a_lone_surrogate_becomes_a_replacement_character(rt: AdaptiveMolmoe) -> None:
    ids = rt.processor.encode_text("colour \ud800 of it")
    assert rt.processor.decode(ids) == "colour \ufffd of it"
    out = rt.generate("What color \udfff is the square?", [red_square()], Plan(3, 8, 8), GenerationConfig(4))
    assert isinstance(out.text, str)


@pytest.mark.parametrize(
    ("question", "image", "max_crops", "sizes"),
    [
        ("word " * 5000, red_square(), 3, "image tokens at max_crops 3"),
        (QUESTION, red_square(6000, 6000), 400, "image tokens at max_crops 400"),
    ],
    ids=["long question", "max_crops=400"],
)
def test_prompts_over_the_context_are_refused_with_their_sizes(rt, question, image, max_crops, sizes) -> None:
    with pytest.raises(ValueError) as err:
        rt.generate(question, [image], Plan(max_crops, 8, 8))
    assert "over the model's context of 4096 (config.json max_sequence_length)" in str(err.value)
    assert sizes in str(err.value)


def test_generation_stops_at_the_end_of_the_context(tiny_dir: Path) -> None:
    rt = AdaptiveMolmoe.from_pretrained(tiny_dir, device="cpu")
    n_prompt = rt.processor(QUESTION, [red_square()], max_crops=3).n_tokens
    rt.model.config = replace(rt.model.config, max_sequence_length=n_prompt + 2)
    out = rt.generate(QUESTION, [red_square()], Plan(3, 8, 8), GenerationConfig(max_new_tokens=64, stop_at_eos=False))
    assert len(out.token_ids) == 3 and out.stop_reason == "length"  # positions n_prompt and n_prompt + 1


# -- images -------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the pixels rotated 90 degrees clockwise
    red_square(300, 200).save(buffer, format="PNG", exif=exif)
    photo = Image.open(io.BytesIO(buffer.getvalue()))
    assert photo.size == (300, 200)
    pixels = to_rgb_array(photo)
    assert pixels.shape == (300, 200, 3) and image_size(photo) == (300, 200)
    assert np.array_equal(pixels, np.array(ImageOps.exif_transpose(photo).convert("RGB")))


@pytest.mark.parametrize("mode", ["I", "I;16", "F"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(mode: str) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.float64)
    image = Image.fromarray(values.astype({"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]))
    assert image.mode == mode and to_rgb_array(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_greyscale_within_zero_one_is_scaled_from_zero_one() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert to_rgb_array(image)[0, :, 0].tolist() == [0, 128, 255]


def test_an_animated_image_gives_its_first_frame_and_keeps_its_position() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    gif = Image.open(io.BytesIO(buffer.getvalue()))
    gif.seek(1)
    assert tuple(to_rgb_array(gif)[0, 0]) == (255, 0, 0) and gif.tell() == 1


def truncated_png() -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:3000]))


def test_a_truncated_image_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="could not be decoded"):
        to_rgb_array(truncated_png())


def test_a_request_that_cannot_be_served_stops_the_run_naming_the_doc(lmm_class, tmp_path: Path) -> None:
    lmm = make_lmm(lmm_class, f"tier=low,log_dir={tmp_path}")
    lmm.task_dict = {"t": {"test": {0: {"image": red_square()}, 7: {"image": truncated_png()}}}}
    good = instance("generate_until", (QUESTION, {"max_new_tokens": 2}, lambda d: [d["image"]], 0, "t", "test"))
    bad = instance("generate_until", (QUESTION, {"max_new_tokens": 2}, lambda d: [d["image"]], 7, "t", "test"), 7)
    with pytest.raises(ValueError, match=r"t doc 7 \(test\) cannot be served: the image could not be decoded"):
        lmm.generate_until([good, bad])
    (records,) = tmp_path.glob("*.jsonl")
    assert [r.doc_id for r in read_records(records)] == [0]  # what was served before stays recorded


# -- checkpoints and artifacts ------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_fingerprint_covers_the_whole_weights(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    before = fingerprint(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of the last tensor, far past the first MiB
    weights.write_bytes(bytes(data))
    assert fingerprint(folder) != before
    artifact = static_artifact(Plan(3, 8, 8), before, AdaptiveMolmoe.from_pretrained(tiny_dir).knobs)
    (folder / "static.json").write_text(json.dumps(artifact))
    rt = AdaptiveMolmoe.from_pretrained(folder)
    with pytest.raises(ArtifactError, match="was made for model"):
        controller_from_file(folder / "static.json", rt)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        ({"layer_norm_eps": -1.0}, ConfigError, "key 'layer_norm_eps' must be > 0, got -1.0"),
        ({"rope_theta": 0}, ConfigError, "key 'rope_theta' must be > 0, got 0.0"),
        ({"max_crops": 0}, ConfigError, "config.json: key 'max_crops' must be >= 1, got 0"),
    ],
)
def test_impossible_config_values_are_refused_at_load(tiny_dir, tmp_path, edit, error, message) -> None:
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    edit_config(folder, **edit)
    with pytest.raises(error) as err:
        AdaptiveMolmoe.from_pretrained(folder)
    assert message in str(err.value)


def test_non_finite_weights_are_refused_at_load(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    name = "model.transformer.blocks.2.mlp.ff_norm.weight"
    tensors[name][3] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds NaN or infinite values"):
        load_model(folder)


def test_non_finite_logits_raise_naming_the_first_block(tiny_dir: Path) -> None:
    rt = AdaptiveMolmoe.from_pretrained(tiny_dir, device="cpu")
    with torch.no_grad():
        rt.model.model.transformer.blocks[3].mlp.ff_norm.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="the first NaN or infinite values appear in decoder block 3"):
        rt.generate(QUESTION, [red_square()], Plan(3, 8, 8))


def test_a_preprocessor_config_that_contradicts_the_vit_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(image_patch_size=14, image_token_length_h=12, image_token_length_w=12, overlap_margins=[4, 4])
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json .* disagrees with the ViT of .*config\.json"):
        AdaptiveMolmoe.from_pretrained(folder)


def test_an_invalid_tokenizer_names_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_dir, tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a usable tokenizer"):
        AdaptiveMolmoe.from_pretrained(folder)


def test_a_static_artifact_without_a_plan_is_refused(rt: AdaptiveMolmoe) -> None:
    artifact = static_artifact(Plan(3, 8, 8), rt.model_id, rt.knobs)
    del artifact["plan"]
    with pytest.raises(ArtifactError, match="static controller artifact: needs 'plan'"):
        load_controller(artifact, rt)


# -- run folders and records --------------------------------------------------------------------------


def hold(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder` as a running command does."""
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom lmms_adaptive.tools.runlog import exclusive\n"
        f"with exclusive(Path({str(folder)!r}), 'test'):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_profile_folder_in_use_is_refused(rt: AdaptiveMolmoe, tmp_path: Path) -> None:
    proc = hold(tmp_path / "prof")
    try:
        with pytest.raises(FolderInUse, match="in use by another profile process"):
            profile.sweep(rt, [], [Plan(3, 8, 8)], tmp_path / "prof")
    finally:
        proc.kill()
        proc.wait()
    assert profile.sweep(rt, [], [Plan(3, 8, 8)], tmp_path / "prof").name == "rows.parquet"  # free again


def test_a_training_folder_in_use_is_refused(tmp_path: Path) -> None:
    from lmms_adaptive.tools.train import TrainConfig, train

    proc = hold(tmp_path / "run")
    try:
        with pytest.raises(FolderInUse, match="in use by another python -m lmms_adaptive.train process"):
            train(tmp_path / "run", TrainConfig(), device="cpu")
    finally:
        proc.kill()
        proc.wait()


def test_a_torn_last_line_does_not_take_the_next_record_with_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    whole, torn = make_record(doc_id=0), make_record(doc_id=1).to_json()[:40]
    path.write_text(whole.to_json() + "\n" + torn)
    writer = RecordWriter(path)
    writer.write(make_record(doc_id=2))
    writer.close()
    assert [r.doc_id for r in read_records(path)] == [0, 2]


def test_records_of_two_runs_in_one_second_go_to_two_files(lmm_class, tmp_path: Path) -> None:
    args = (QUESTION, {"max_new_tokens": 2}, lambda d: [d["image"]], 0, "t", "test")
    for _ in range(2):
        lmm = make_lmm(lmm_class, f"tier=low,log_dir={tmp_path}")
        lmm.task_dict = {"t": {"test": {0: {"image": red_square()}}}}
        lmm.generate_until([instance("generate_until", args)])
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 2 and all(len(read_records(f)) == 1 for f in files)
    assert len(list(tmp_path.glob("*.summary.json"))) == 2


def test_loglikelihood_requests_are_recorded_and_summarised(lmm_class, tmp_path: Path) -> None:
    lmm = make_lmm(lmm_class, f"tier=low,log_dir={tmp_path}")
    lmm.task_dict = {"t": {"test": {0: {"image": red_square()}}}}
    lmm.loglikelihood([instance("loglikelihood", ("Colour?", " red", lambda d: [d["image"]], 0, "t", "test"))])
    (summary,) = tmp_path.glob("*.summary.json")
    assert json.loads(summary.read_text())["overall"]["n_requests"] == 1
