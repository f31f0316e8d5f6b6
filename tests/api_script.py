"""A user's script around ``hybridiff.parallelize``, started by the tests with torchrun.

``api_script.py generate FOLDER PLAN OUT``: loads the pipeline folder with diffusers, and
generates three prompts in two calls (the second with ``num_images_per_prompt=2`` and a
callback recording the steps it saw); rank 0 saves the images, every rank its steps.

``api_script.py video PLAN OUT``: a few frames of the tiny Wan through the stock WanPipeline;
rank 0 saves them (``video.pt``) and the report.

``api_script.py mistakes FOLDER PLAN OTHER_PLAN OUT``: in a process group the script set up
itself, rank 1 passes a plan for another model, then the ranks make different calls, then a
right one; every rank records the errors it got.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import StableDiffusionXLPipeline

import hybridiff

PROMPTS = ["a handwritten digit three", "a handwritten digit seven", "a handwritten digit five"]
SEEDS = [11, 12, 13, 14]


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def generate(folder: str, plan: str, out: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    seen: list[int] = []

    def record(pipe, step, timestep, tensors):
        seen.append(step)
        return tensors

    with hybridiff.parallelize(pipe, plan) as ppipe:
        first = ppipe(prompt=PROMPTS[:2], generator=generators(SEEDS[:2]))
        second = ppipe(prompt=PROMPTS[2], num_images_per_prompt=2, generator=generators(SEEDS[2:]), callback_on_step_end=record)
        report = ppipe.last_report
        rank = ppipe.rank
    (out / f"steps-rank{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        for i, image in enumerate(first.images + second.images):
            image.save(out / f"api-{i}.png")
        (out / "report.json").write_text(json.dumps([r.__dict__ for r in report.replicas]))
    else:
        assert first is None and second is None and report is None


def mistakes(folder: str, plan: str, other_plan: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    errors = []
    try:
        hybridiff.parallelize(pipe, other_plan if rank == 1 else plan)
    except hybridiff.HybridiffError as e:
        errors.append(str(e))
    ppipe = hybridiff.parallelize(pipe, plan)
    try:
        ppipe(prompt="a 1", generator=generators([rank]), num_inference_steps=2)
    except hybridiff.HybridiffError as e:
        errors.append(str(e))
    fine = ppipe(prompt="a 1", generator=generators([0]), num_inference_steps=2, output_type="latent")
    ppipe.close()
    result = {"errors": errors, "fine": fine is not None, "group_kept": dist.is_initialized()}
    (out / f"mistakes-rank{rank}.json").write_text(json.dumps(result))
    # left uncaught, as a script's bug would be: one line and exit code 2 on each rank
    hybridiff.parallelize(pipe, plan)(prompt="a 1", generator=generators([0]), callback_on_step_end=5)


def blocks(folder: str, plan: str, out: Path, times: int = 5) -> None:
    """``times`` parallel blocks one after the other in one process, each in the group the
    library created; rank 0 saves each block's image."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for block in range(times):
        with hybridiff.parallelize(pipe, plan) as ppipe:
            result = ppipe(prompt=PROMPTS[0], generator=generators([SEEDS[0]]), num_inference_steps=6)
            if ppipe.rank == 0:
                result.images[0].save(out / f"block-{block}.png")


def endless(folder: str, plan: str) -> None:
    """Calls for two minutes in one block, for a test to stop a rank mid-call. Bounded: should
    the test fail to end the job, its workers (which torchrun starts in sessions of their own,
    out of the test's reach) do not outlive it by more."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    deadline = time.monotonic() + 120
    with hybridiff.parallelize(pipe, plan) as ppipe:
        while time.monotonic() < deadline:
            ppipe(prompt=PROMPTS[0], generator=generators([SEEDS[0]]), num_inference_steps=6, output_type="latent")


def video(plan: str, out: Path) -> None:
    from hybridiff.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-wan")
    with hybridiff.parallelize(pipe, plan) as ppipe:
        result = ppipe(prompt="a red cube turning", generator=generators([3]), output_type="pt")
        if ppipe.rank == 0:
            torch.save(result.frames, out / "video.pt")
            (out / "report.json").write_text(json.dumps([r.__dict__ for r in ppipe.last_report.replicas]))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "generate":
        generate(args[0], args[1], Path(args[2]))
    elif mode == "blocks":
        blocks(args[0], args[1], Path(args[2]))
    elif mode == "endless":
        endless(args[0], args[1])
    elif mode == "video":
        video(args[0], Path(args[1]))
    else:
        mistakes(args[0], args[1], args[2], Path(args[3]))
