"""Bad input is refused in one line before anything is loaded or launched, and outputs are
never stale: a folder holding an earlier run is refused unless ``--overwrite``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hybridiff.runtime.run.report import RunReport
from tests.conftest import invoke


def _assert_refused(result, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        (["--seed", "99999999999999999999"], {}, "outside 0..2**64-1"),
        (["--seed", "-1"], {}, "outside 0..2**64-1"),
        (["--guidance-scale", "inf"], {}, "give a finite number"),
        (["--guidance-scale", "nan"], {}, "give a finite number"),
        (["--steps", "5000"], {}, "give 1 to 1000 steps"),
        (["--scheduler", "flow-euler"], {}, "does not fit this noise-prediction model"),
        ([], {"HYBRIDIFF_TIMEOUT_S": "0"}, "HYBRIDIFF_TIMEOUT_S='0': give whole seconds from 2 to 86400"),
        ([], {"HYBRIDIFF_TIMEOUT_S": "abc"}, "HYBRIDIFF_TIMEOUT_S='abc'"),
    ],
)
def test_run_refuses_bad_requests_before_launching(plan_path, tmp_path, args, env, fragment):
    out = tmp_path / "out"
    _assert_refused(invoke("run", str(plan_path), "--prompt", "x", *args, "-o", str(out), env=env), fragment)
    assert not out.exists()


@pytest.mark.parametrize("where", ["a-file", "a-file/out", "/proc/hybridiff-out"])
def test_run_refuses_an_output_folder_it_cannot_write_before_launching(plan_path, tmp_path, where):
    (tmp_path / "a-file").write_text("keep me")
    out = tmp_path / where if not where.startswith("/") else where
    result = invoke("run", str(plan_path), "--prompt", "x", "-o", str(out))
    _assert_refused(result, "is a file, not a folder" if "a-file" in where else "cannot create")
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_an_earlier_run_is_refused_unless_overwrite_which_leaves_no_stale_image(plan_path, tmp_path):
    out = tmp_path / "out"
    long_prompt = " ".join(["a red cube on a wooden table"] * 20)
    args = ["--prompt", long_prompt, "--num-images-per-prompt", "2", "--steps", "2", "--emulate"]
    first = invoke("run", str(plan_path), *args, "-o", str(out))
    assert first.returncode == 0, first.stderr
    warning = r"warning: the prompt of image 0 is \d+ tokens long; the text encoder reads the first 32 and ignores the rest"
    assert re.search(warning, first.stderr)
    _assert_refused(invoke("run", str(plan_path), "--prompt", "x", "--emulate", "-o", str(out)), "holds an earlier run")
    again = invoke("run", str(plan_path), "--prompt", "x", "--steps", "2", "--emulate", "--overwrite", "-o", str(out))
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and [e["image"] for e in report["images"]] == ["image-0.png"]
    assert sorted(p.name for p in out.iterdir()) == ["image-0.png", "report.json"]


def test_reports_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    report = RunReport(tmp_path, (), {"guidance_scale": math.inf})
    report.write("failed", error="x", totals={"images_per_s": math.nan})

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in report.json")

    written = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert written["guidance_scale"] is None and written["totals"]["images_per_s"] is None


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--height", "37"], "image size 37: give a multiple of 16"),
        (["-o", "{tmp}"], "is a folder; give a file name"),
        (["-o", "{tmp}/a-file/plan.json"], "is a file, not a folder"),
        (["-k", "5,10"], "a plan has one window length; compare several with `hybridiff bench MODEL --k`"),
        (["-k", "-1"], "window lengths are >= 0"),
    ],
)
def test_compile_refuses_sizes_and_outputs_before_compiling(tmp_path, args, fragment):
    (tmp_path / "a-file").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    _assert_refused(invoke("compile", "builtin:tiny-sdxl", "--cost", "flops", *args), fragment)


def test_inspect_and_simulate_draw_into_a_new_folder_and_bound_the_batch(plan_path, tmp_path):
    assert invoke("inspect", str(plan_path), "--plot", str(tmp_path / "new" / "plan.png")).returncode == 0
    assert (tmp_path / "new" / "plan.png").is_file()
    result = invoke("simulate", str(plan_path), "--batch", "100000000")
    assert result.returncode == 2 and "4096" in result.stderr


def test_a_deeply_nested_plan_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("[" * 100_000 + "]" * 100_000)
    _assert_refused(invoke("inspect", str(bad)), "nested too deeply")


def test_two_ranks_on_one_gpu_under_torchrun_are_refused_in_one_line(plan, tmp_path, monkeypatch):
    import torch

    from hybridiff.errors import HybridiffError
    from hybridiff.runtime.run.options import RunOptions
    from hybridiff.runtime.run.session import _placement

    monkeypatch.setenv("HYBRIDIFF_DEVICE", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HybridiffError, match=r"2 workers on this machine but 1 visible GPU\(s\): NCCL needs a GPU per worker"):
        _placement(RunOptions(plan=tmp_path / "plan.json", requests=(), out=tmp_path), plan)


def test_a_fault_in_a_worker_is_one_line_with_its_traceback_in_a_log(tmp_path):
    from hybridiff.runtime.launch.worker import failure_line

    try:
        raise ValueError("first line\nthe line that says why")
    except ValueError as e:
        line = failure_line(e, 1, tmp_path)
    log = tmp_path / "logs" / "rank-1.log"
    assert line == f"worker rank 1 failed: ValueError: the line that says why (traceback: {log})"
    assert "Traceback" in log.read_text() and "test_a_fault_in_a_worker" in log.read_text()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from hybridiff.models import load_pipeline

    folder = tmp_path_factory.mktemp("model") / "tiny-sdxl"
    load_pipeline("builtin:tiny-sdxl").save_pretrained(folder)
    return folder


def _pickled_unet(folder) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


def _edit_index(**changes):
    def edit(folder) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, **changes}))

    return edit


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (_edit_index(_class_name="EvilPipeline"), "no attribute EvilPipeline"),
        (_edit_index(unet=["evil_module", "EvilUNet"]), "evil_module is not one of the libraries"),
        (_pickled_unet, "no file named diffusion_pytorch_model.safetensors"),
    ],
)
def test_a_model_folder_with_custom_code_or_pickled_weights_is_refused_in_one_line(saved_model, tmp_path, tamper, fragment):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    tamper(folder)
    result = invoke("compile", str(folder), "--cost", "flops", "--no-calibrate", "-o", str(tmp_path / "p.json"))
    _assert_refused(result, fragment)
    assert "never custom code or pickled weights" in result.stderr and not (tmp_path / "p.json").exists()


def test_a_controlnet_pipeline_folder_is_refused_in_one_line(tmp_path):
    """ControlNet needs an image on every call: compile says so, exit 2, no plan written."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from hybridiff.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sdxl")
    parts = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    controlnet = ControlNetModel.from_unet(pipe.unet)
    controlled = StableDiffusionXLControlNetPipeline(**{k: pipe.components[k] for k in parts}, controlnet=controlnet)
    controlled.save_pretrained(tmp_path / "model")
    result = invoke("compile", str(tmp_path / "model"), "--cost", "flops", "--no-calibrate", "-o", str(tmp_path / "p.json"))
    _assert_refused(result, "StableDiffusionXLControlNetPipeline cannot generate from a prompt alone (TypeError: image must be passed")
    assert "ControlNet" in result.stderr.splitlines()[-1] and not (tmp_path / "p.json").exists()
