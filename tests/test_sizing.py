"""Sizes no forward can run at: priced without running them, refused in one line where they
must run, and a signal that ends a compile stuck inside one long native call."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
import torch

from hybridiff.compiler.cost import _flop_counter
from hybridiff.compiler.entries import guided_inputs
from hybridiff.compiler.sizing import size_forward, to_meta, traced_on_meta
from hybridiff.graph.pipeline import default_image_size, example_call, trace_pipeline
from hybridiff.graph.rows import branch_inputs
from hybridiff.models import load_pipeline, resolve_source
from tests.conftest import invoke

BIG = ["--height", "8192", "--width", "8192", "--gpus", "2", "--threads", "1"]


def test_a_size_too_big_to_run_is_priced_without_running_it(tmp_path):
    out = tmp_path / "plan.json"
    start = time.monotonic()
    result = invoke("compile", "builtin:digits-sdxl", *BIG, "--cost", "flops", "-o", str(out))
    seconds = time.monotonic() - start
    # one forward at 8192x8192 is 1840 TFLOP: hours here; run, this took more than 39 minutes
    assert result.returncode == 0 and seconds < 60, (seconds, result.stderr)
    note = next(line for line in result.stderr.splitlines() if line.startswith("note:"))
    assert "one forward at 8192x8192 is 1.84e+03 TFLOP" in note and "priced without running it" in note
    plan = json.loads(out.read_text())
    assert (plan["model"]["height"], plan["model"]["width"]) == (8192, 8192)
    assert plan["estimates"]["forward_s"] > 3600 and plan["cut_tensors"]


def test_timing_a_size_too_big_to_run_is_refused_in_one_line(tmp_path):
    out = tmp_path / "plan.json"
    result = invoke("compile", "builtin:digits-sdxl", *BIG, "-o", str(out))
    assert result.returncode == 2 and not out.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "too big to time here; --cost flops prices it without running it" in errors[0]


@pytest.mark.parametrize("model", ["digits-sdxl", "tiny-flux"])
def test_the_meta_copy_is_the_graph_plans_are_made_for_and_counts_the_flops_a_real_forward_does(model):
    pipe = load_pipeline(resolve_source(f"builtin:{model}"), "float32", torch.device("cpu"))
    side = default_image_size(pipe)
    call = partial(example_call, pipe, side, side)
    real, meta = trace_pipeline(pipe, call=call), traced_on_meta(pipe, call)
    assert meta.fingerprint == real.fingerprint  # a priced plan runs on the real model
    _, cond = branch_inputs(guided_inputs(real, side, side, {}), real.adapter.latent)
    with torch.inference_mode(), _flop_counter() as counter:
        real.graph(**cond)
    size = size_forward(meta.graph, to_meta(cond))
    assert size.flops == counter.get_total_flops() > 0
    assert size.weights_bytes == sum(p.numel() * p.element_size() for p in real.denoiser.parameters())


STUCK = """
import torch
from hybridiff.errors import run_cli, stop_promptly
torch.set_num_threads(1)
a = torch.randn(7000, 7000)
def app():
    with stop_promptly():
        print("ready", flush=True)
        a @ a  # one native call of several seconds: Python's handler cannot run inside it
run_cli(app)
"""


def test_a_signal_ends_a_compile_stuck_in_one_long_native_call_within_two_seconds():
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.monotonic() - start < 2.5, (time.monotonic() - start, stderr)
    assert stderr.strip() == "error: interrupted by SIGTERM"
