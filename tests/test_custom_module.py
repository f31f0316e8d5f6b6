"""A denoiser of the user's own (``examples/custom_dit.py``) in the user's own loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybridiff
from examples.custom_dit import build, example_inputs, sample
from hybridiff.errors import HybridiffError
from hybridiff.plan import Schedule

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "custom_dit.py")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
#: Short; the cap opens the window at step 4, so a loop goes through every phase.
WINDOWED = Schedule(steps=10, guidance_scale=4.0, L=2, g_slope=4e-4, tau_cap=4, k=3)
#: No window: the rule cannot fire (L = steps) and the cap is past the last step.
EXACT = WINDOWED.model_copy(update={"tau_cap": 20, "L": 10})


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build()


def _plan(model: torch.nn.Module, schedule: Schedule, path: Path, guidance: str = "batched") -> Path:
    hybridiff.compile(model, example_inputs(), gpus=2, latent="x", schedule=schedule, cost="flops", guidance=guidance).save(path)
    return path


@pytest.mark.parametrize("two_calls", [False, True])
def test_the_loop_gives_the_plain_loops_output_where_the_schedule_is_exact(model, two_calls, tmp_path):
    """Bit for bit with one call per branch (the plain loop runs the same one-row forwards);
    batched, to the rounding of a 2-row forward against two 1-row ones."""
    guidance = "two-calls" if two_calls else "batched"
    plan = _plan(model, EXACT, tmp_path / "plan.json", guidance)
    with torch.inference_mode():
        plain = sample(model, steps=EXACT.steps, two_calls=two_calls)
    with hybridiff.parallelize(model, plan, guidance=guidance, emulate=True) as denoiser:
        with denoiser.loop(steps=EXACT.steps):
            out = sample(denoiser, steps=EXACT.steps, two_calls=two_calls)
    if two_calls:
        assert torch.equal(out, plain)
    else:
        assert (out - plain).abs().max() < 1e-4
    report = denoiser.last_report
    assert report.tau1 is None and set(report.phases) == {"warm-up"} and None not in report.discrepancy


def test_workers_equal_the_emulation_through_the_window(model, tmp_path):
    """``torchrun`` on the example script: rank 0's samples equal the emulated loop's, both
    guidance patterns, and the window made them differ from the plain loop's."""
    env = {**os.environ, "HYBRIDIFF_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    for flag in ([], ["--two-calls"]):
        plan = _plan(model, WINDOWED, tmp_path / f"plan{flag}.json", "two-calls" if flag else "batched")
        out = tmp_path / f"workers{flag}.pt"
        command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", EXAMPLE, "sample", str(plan), str(out), *flag]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "tau1=4 tau2=7" in result.stdout
        with hybridiff.parallelize(model, plan, guidance="two-calls" if flag else "batched", emulate=True) as denoiser:
            with denoiser.loop(steps=WINDOWED.steps):
                emulated = sample(denoiser, steps=WINDOWED.steps, two_calls=bool(flag))
        assert torch.equal(torch.load(out), emulated)
    with torch.inference_mode():
        assert not torch.equal(emulated, sample(model, steps=WINDOWED.steps))


def test_misuse_is_one_line(model, tmp_path):
    plan = _plan(model, WINDOWED, tmp_path / "plan.json")
    x, t, c = example_inputs(2)
    with hybridiff.parallelize(model, plan, emulate=True) as denoiser:
        with pytest.raises(HybridiffError, match="inside `with denoiser.loop"):
            denoiser(x, t, c)
    with pytest.raises(HybridiffError, match="compiled for guidance='batched'"):
        hybridiff.parallelize(model, plan, guidance="two-calls", emulate=True)
    two_calls = _plan(model, WINDOWED, tmp_path / "two.json", "two-calls")
    with hybridiff.parallelize(model, two_calls, guidance="two-calls", emulate=True) as denoiser:
        with pytest.raises(HybridiffError, match="two calls per step"), denoiser.loop(steps=WINDOWED.steps):
            sample(denoiser, steps=WINDOWED.steps)  # one [uncond; cond] call per step
    other = build(seed=1)
    other.blocks = other.blocks[:3]
    with hybridiff.parallelize(other, plan, emulate=True) as denoiser:
        with pytest.raises(HybridiffError, match="fingerprint"), denoiser.loop(steps=WINDOWED.steps):
            sample(denoiser, steps=WINDOWED.steps)
