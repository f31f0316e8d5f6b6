"""The trained built-in models: they load offline, draw the digit asked for, and run hybrid.

The digit checks use seeds the documented measurement run classified correctly; a failure
means the model, the pipeline or the classifier changed.
"""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

from hybridiff.compiler.entries import compile_model
from hybridiff.models import load_pipeline, model_card
from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.zoo.classifier import classifier_card, classify
from hybridiff.zoo.digits import PROMPTS, prompt_digit
from tests.conftest import TEST_SCHEDULE, invoke
from tests.equivalence import assert_workers_equal_emulation

MODELS = {"digits-sdxl": StableDiffusionXLPipeline, "digits-sd3": StableDiffusion3Pipeline}


def test_prompts_name_their_digit():
    assert [prompt_digit(p) for p in PROMPTS] == list(range(10))
    assert prompt_digit("a handwritten digit 4, bold") == 4 and prompt_digit("a red cube") is None


def test_the_classifier_was_validated_on_held_out_digits():
    card = classifier_card()
    assert card["held_out_images"] == 360 and card["held_out_accuracy"] >= 0.97


@pytest.mark.parametrize("name", MODELS)
def test_trained_models_draw_the_digit_asked_for(name):
    pipe = load_pipeline(f"builtin:{name}")
    assert isinstance(pipe, MODELS[name])
    card = model_card(f"builtin:{name}")
    asked = [2, 5, 7, 0]
    with torch.inference_mode():
        images = pipe(
            prompt=[PROMPTS[d] for d in asked],
            num_inference_steps=card["schedule"]["steps"],
            guidance_scale=card["schedule"]["guidance_scale"],
            generator=[torch.Generator().manual_seed(d) for d in asked],
            **card["pipeline_kwargs"],
        ).images
    assert classify(images) == asked


@pytest.mark.parametrize("name", MODELS)
def test_two_workers_equal_the_emulation_and_draw_the_digit_asked_for(name, tmp_path):
    schedule = TEST_SCHEDULE.model_copy(update={"steps": 20, "tau_cap": 8})
    plan = compile_model(f"builtin:{name}", schedule=schedule, repeats=1, threads=1, cost="flops")
    plan.save(tmp_path / "plan.json")
    hybrid, _ = assert_workers_equal_emulation(tmp_path / "plan.json", tmp_path, [ImageRequest(PROMPTS[3], None, 3)])
    assert "window" in hybrid["images"][0]["phases"]
    scored = invoke("eval", "accuracy", str(tmp_path / "hybrid"), "--digits", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["read"] == [3]  # the classifier reads the digit asked for


def test_eval_accuracy_refuses_a_folder_without_a_report(tmp_path):
    result = invoke("eval", "accuracy", str(tmp_path), "--digits")
    assert result.returncode == 2 and "report.json is missing" in result.stderr


def test_compile_takes_schedule_defaults_from_the_model_card(tmp_path):
    out = tmp_path / "plan.json"
    result = invoke("compile", "builtin:digits-sd3", "--cost", "flops", "--repeats", "1", "-k", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    card = model_card("builtin:digits-sd3")
    assert plan["schedule"]["tau_cap"] == card["schedule"]["tau_cap"] and plan["schedule"]["k"] == 3
    assert plan["model"]["pipeline_kwargs"] == card["pipeline_kwargs"]
