"""``hybridiff.parallelize``: a plan run inside the user's own diffusers code."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import hybridiff
from hybridiff.compiler.entries import compile_model
from hybridiff.errors import HybridiffError
from hybridiff.models import load_pipeline
from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.runtime.run.session import RunOptions, execute
from tests.api_script import PROMPTS, SEEDS
from tests.conftest import TEST_SCHEDULE, cli, invoke

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SCRIPT = str(Path(__file__).with_name("api_script.py"))
DIGITS = "builtin:digits-sdxl"


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two local ranks of ``api_script.py`` on a standalone rendezvous; killed if they hang."""
    env = {**os.environ, "HYBRIDIFF_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", SCRIPT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``builtin:digits-sdxl`` saved as a diffusers pipeline folder, as a user would have it."""
    path = tmp_path_factory.mktemp("model") / "digits-sdxl"
    result = invoke("save-model", DIGITS, str(path))
    assert result.returncode == 0, result.stderr
    return path


def _plan(source: str, mesh: str, path: Path) -> Path:
    """A 12-step plan of ``source`` with a window early on (as the suite's test plans)."""
    compile_model(source, schedule=TEST_SCHEDULE, mesh=mesh, repeats=1, threads=1, cost="flops").save(path)
    return path


def test_a_torchrun_script_generates_what_hybridiff_run_does(folder, tmp_path):
    """Two replicas (dp=2): each call's images are shared among them, the second call with
    num_images_per_prompt=2; the images equal `hybridiff run`'s pixel for pixel."""
    plan = _plan(str(folder), "dp=2,cfg=1,pp=1", tmp_path / "plan.json")
    out = tmp_path / "api"
    out.mkdir()
    result = _torchrun("generate", str(folder), str(plan), str(out))
    assert result.returncode == 0, result.stdout + result.stderr

    prompts = tmp_path / "prompts.jsonl"
    requested = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[2]]
    prompts.write_text("".join(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in zip(requested, SEEDS)))
    ran = cli("run", str(plan), "--prompts", str(prompts), "--threads", "1", "-o", str(tmp_path / "run"))
    assert ran.returncode == 0, ran.stderr
    for i in range(4):
        api = np.asarray(Image.open(out / f"api-{i}.png"))
        assert np.array_equal(api, np.asarray(Image.open(tmp_path / "run" / f"image-{i}.png"))), f"image {i}"
    steps = TEST_SCHEDULE.steps
    for rank in (0, 1):  # every rank ran the user's callback on every step of its call
        assert json.loads((out / f"steps-rank{rank}.json").read_text()) == list(range(steps))
    replicas = json.loads((out / "report.json").read_text())
    assert [r["images"] for r in replicas] == [[0], [1]]
    assert all(len(r["phases"]) == steps and r["latency_s"] > 0 for r in replicas)


def test_mistakes_stop_every_rank_with_one_line_and_no_hang(folder, plan_path, tmp_path):
    """Rank 1 passes a plan for another model; then the ranks make different calls; both
    ranks hear of each mistake and go on, in the process group the script set up itself. A
    last mistake left uncaught ends each rank with one line and exit code 2, no traceback."""
    plan = _plan(str(folder), "dp=1,cfg=1,pp=2", tmp_path / "plan.json")
    result = _torchrun("mistakes", str(folder), str(plan), str(plan_path), str(tmp_path))
    assert set(re.findall(r"exitcode\s*: (\d+)", result.stderr)) == {"2"}, result.stderr
    assert result.stderr.count("error: callback_on_step_end is a int, which cannot be called") == 2, result.stderr
    assert "HybridiffError" not in result.stderr, result.stderr
    said = [json.loads((tmp_path / f"mistakes-rank{r}.json").read_text()) for r in (0, 1)]
    fingerprint, different = said[1]["errors"]
    assert fingerprint.startswith("plan fingerprint") and "builtin:tiny-sdxl" in fingerprint
    assert said[0]["errors"] == [f"rank 1: {fingerprint}", different]
    assert different.startswith("rank 1 called the pipeline with a different 'generator' than rank 0")
    assert said[0]["fine"] and not said[1]["fine"]  # rank 0 gets the output
    assert said[0]["group_kept"] and said[1]["group_kept"]  # close() leaves a group it did not create


def test_parallel_blocks_entered_five_times_in_one_torchrun_job(folder, tmp_path):
    """Each block makes the same call and gets the same image; re-creating the group between
    blocks raced at the second rendezvous (gloo "Connection refused", or a hang)."""
    plan = _plan(str(folder), "dp=1,cfg=1,pp=2", tmp_path / "plan.json")
    result = _torchrun("blocks", str(folder), str(plan), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    images = [np.asarray(Image.open(tmp_path / f"block-{b}.png")) for b in range(5)]
    assert all(np.array_equal(images[0], image) for image in images[1:])
    assert images[0].std() > 0  # a real image, not a blank one


def test_a_stopped_torchrun_rank_is_named_by_its_peer_within_half_the_timeout(folder, tmp_path):
    """Under torchrun the ranks watch each other's heartbeats: rank 1 stopped mid-call is named
    in one line within half of HYBRIDIFF_TIMEOUT_S (not found only by the collective timeout)."""
    plan = _plan(str(folder), "dp=1,cfg=1,pp=2", tmp_path / "plan.json")
    env = {**os.environ, "HYBRIDIFF_TIMEOUT_S": "8", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", SCRIPT, "endless", str(folder), str(plan)]
    job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (found := next(tmp_path.glob("hybridiff-torchrun-*/heartbeat/rank-1"), None)):
            assert job.poll() is None and time.monotonic() < deadline, "rank 1 never beat"
            time.sleep(0.1)
        time.sleep(2)  # into the calls
        os.kill(int(found.read_text().split()[0]), signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0 and time.monotonic() - stopped < 4 + 20, stderr
    assert re.search(r"error: worker rank 1 stopped responding: no heartbeat for \d+ s", stderr), stderr


@pytest.fixture(scope="module")
def digits() -> object:
    pipe = load_pipeline(DIGITS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-stage pipeline plan (cut tensors cross ranks in the window) of the digits model."""
    return _plan(DIGITS, "dp=1,cfg=1,pp=2", tmp_path_factory.mktemp("plan") / "plan.json")


def _seed(seed: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed)]


def test_latent_output_and_a_scheduler_swapped_after_parallelize(digits, pipelined, tmp_path):
    euler = digits.scheduler
    ppipe = hybridiff.parallelize(digits, pipelined, emulate=True)
    try:
        digits.scheduler = DDIMScheduler.from_config(euler.config)
        kept = {}

        def keep(pipe, step, timestep, tensors):
            kept["latents"] = tensors["latents"].clone()
            return tensors

        image = ppipe(prompt="a 4", generator=_seed(3), callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        latent = ppipe(prompt="a 4", generator=_seed(3), output_type="latent").images
        assert ppipe.last_report.tau1 is not None and "window" in ppipe.last_report.phases
    finally:
        digits.scheduler = euler
        ppipe.close()
    assert torch.equal(latent, kept["latents"])  # the denoised latent, not decoded
    assert latent.shape == (1, 4, *(n // digits.vae_scale_factor for n in image.images[0].size[::-1]))
    request = (ImageRequest("a 4", None, 3),)
    for scheduler, same in (("ddim", True), (None, False)):
        opts = RunOptions(plan=pipelined, requests=request, out=tmp_path / str(scheduler), mode="emulate", scheduler=scheduler)
        execute(opts)
        run = np.asarray(Image.open(tmp_path / str(scheduler) / "image-0.png"))
        assert np.array_equal(np.asarray(image.images[0]), run) == same, scheduler


def test_close_leaves_the_pipeline_as_it_was(digits, pipelined):
    original = digits.unet
    during = []

    def look(pipe, step, timestep, tensors):
        during.append(pipe.unet)
        return tensors

    with hybridiff.parallelize(digits, pipelined, emulate=True) as ppipe:
        ppipe(prompt="a 2", generator=_seed(0), num_inference_steps=2, callback_on_step_end=look, output_type="latent")
        assert during[0] is not original and during[0].inner is original  # the stand-in, only during the call
        assert digits.unet is original

        def fail(pipe, step, timestep, tensors):
            raise RuntimeError("the user's callback failed")

        with pytest.raises(RuntimeError):
            ppipe(prompt="a 2", generator=_seed(0), num_inference_steps=2, callback_on_step_end=fail)
        assert digits.unet is original
    assert digits.unet is original
    with pytest.raises(HybridiffError, match="closed"):
        ppipe(prompt="a 2")


MISTAKES = [
    ({"callback_on_step_end": 5}, r"^callback_on_step_end is a int, which cannot be called: pass a function"),
    ({"generator": _seed(0), "num_images_per_prompt": 2}, r"^generator is a list of 1 but the call makes 2 image\(s\)"),
    ({"timesteps": [[999, 500]]}, r"^timesteps must be one list of numbers, one per step .*got shape \(1, 2\)"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]},
     r"^StableDiffusionXLPipeline refused the call \(ValueError: `callback_on_step_end_tensor_inputs` has to be in"),
]


@pytest.mark.parametrize("mistake, line", MISTAKES, ids=["callback", "generators", "timesteps", "pipeline-check"])
def test_a_mistaken_argument_is_one_line_before_any_step_runs(digits, pipelined, mistake, line):
    with hybridiff.parallelize(digits, pipelined, emulate=True) as ppipe:
        with pytest.raises(HybridiffError, match=line):
            ppipe(**{"prompt": "a 3", "generator": _seed(0), "num_inference_steps": 2, **mistake})
        assert ppipe.last_report is None  # no call finished
        tuple_out = ppipe(prompt="a 3", generator=_seed(0), num_inference_steps=2, output_type="latent", return_dict=False)
    assert isinstance(tuple_out, tuple) and tuple_out[0].shape[0] == 1  # return_dict=False works as in the stock pipeline


def test_weights_changed_in_place_between_calls_are_used(digits, pipelined):
    """LoRA fusing changes weights in place; the next call must use them, as a fresh
    parallelize would."""
    call = {"prompt": "a 9", "num_inference_steps": 4, "output_type": "latent"}
    weight = digits.unet.conv_in.weight
    with hybridiff.parallelize(digits, pipelined, emulate=True) as ppipe:
        before = ppipe(**call, generator=_seed(1)).images
        with torch.no_grad():
            weight.mul_(1.5)
        try:
            after = ppipe(**call, generator=_seed(1)).images
            with hybridiff.parallelize(digits, pipelined, emulate=True) as fresh:
                assert torch.equal(after, fresh(**call, generator=_seed(1)).images)
        finally:
            with torch.no_grad():
                weight.div_(1.5)
    assert not torch.equal(before, after)


def test_calls_that_do_not_fit_the_plan_say_what_does(digits, pipelined, tmp_path):
    ppipe = hybridiff.parallelize(digits, pipelined, emulate=True)
    with pytest.raises(HybridiffError, match=r"compiled for 32x32 images but this call asks height=64"):
        ppipe(prompt="a 1", height=64)
    split = _plan(DIGITS, "dp=1,cfg=2,pp=1", tmp_path / "split.json")
    with pytest.raises(HybridiffError, match="guidance"):
        hybridiff.parallelize(digits, split, emulate=True)(prompt="a 1", guidance_scale=1.0)
    with pytest.raises(HybridiffError, match="torchrun --nproc-per-node 2"):
        hybridiff.parallelize(digits, pipelined)
    replicas = _plan(DIGITS, "dp=2,cfg=1,pp=1", tmp_path / "dp2.json")
    with pytest.raises(HybridiffError, match="pass one per image"):
        hybridiff.parallelize(digits, replicas, emulate=True)(prompt=["a 1", "a 2"], generator=torch.Generator().manual_seed(0))


def test_schedule_defaults_come_from_the_plan(digits, pipelined):
    """A call that names no steps or guidance runs what the plan was tuned for."""
    with hybridiff.parallelize(digits, pipelined, emulate=True) as ppipe:
        ppipe(prompt="a 6", generator=_seed(0), output_type="latent")
        assert len(ppipe.last_report.phases) == TEST_SCHEDULE.steps


#: Every kind of argument a diffusers pipeline takes, built by a function of a seed: equal seeds
#: give equal values in separate objects (as two ranks hold them), other seeds other contents.
ARGUMENT_KINDS = {
    "pil image": lambda seed: Image.new("RGB", (8, 8), seed),
    "pil images": lambda seed: [Image.new("L", (4, 4), seed), Image.new("L", (4, 4), 0)],
    "numpy array": lambda seed: np.full((2, 3), seed, dtype=np.float32),
    "numpy arrays": lambda seed: [np.zeros(2), np.full(2, seed)],
    "tensor": lambda seed: torch.full((2, 2), float(seed)),
    "dict of tensors": lambda seed: {"scale": 0.5, "mask": torch.full((3,), float(seed))},
    "generator": lambda seed: torch.Generator().manual_seed(seed),
    "object": lambda seed: DDIMScheduler(num_train_timesteps=1000 + seed),
}


@pytest.mark.parametrize("kind", sorted(ARGUMENT_KINDS))
def test_equal_call_arguments_agree_across_ranks_and_different_ones_do_not(kind):
    """Each rank digests its call's arguments: equal values built separately (different
    objects, different addresses) agree; different contents do not."""
    from hybridiff.runtime.api.calls import digest

    make = ARGUMENT_KINDS[kind]
    assert digest({"value": make(1)}) == digest({"value": make(1)})
    assert digest({"value": make(1)}) != digest({"value": make(2)})


def test_a_dicts_digest_does_not_depend_on_its_order():
    from hybridiff.runtime.api.calls import digest

    assert digest({"kw": {"a": 1, "b": torch.ones(2)}}) == digest({"kw": {"b": torch.ones(2), "a": 1}})


def test_a_call_too_short_for_the_window_says_so_in_one_line(digits, pipelined, capfd):
    """TEST_SCHEDULE opens the window at tau_cap 6 at the latest: 5 steps end before it."""
    with hybridiff.parallelize(digits, pipelined, emulate=True) as ppipe:
        ppipe(prompt="a 6", generator=_seed(0), output_type="latent", num_inference_steps=5)
        warned = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warned) == 1 and "5 steps end before the plan's tau_cap 6" in warned[0] and "--tau-cap 3" in warned[0]
        ppipe(prompt="a 7", generator=_seed(0), output_type="latent", num_inference_steps=5)
        ppipe(prompt="a 6", generator=_seed(0), output_type="latent")
        assert "tau_cap" not in capfd.readouterr().err  # said once per step count; the plan's steps are enough
