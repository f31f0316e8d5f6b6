"""Families traced by value (``graph.families``) and two-call guidance, on the tiny Flux."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hybridiff
from hybridiff.compiler.entries import compile_model
from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.pipeline import example_call, trace_pipeline
from hybridiff.graph.rows import repeat_rows
from hybridiff.graph.trace import capture_denoiser_calls
from hybridiff.models import load_pipeline
from hybridiff.plan import Schedule, load_plan
from hybridiff.runtime.execution.pairing import BranchPairing
from hybridiff.runtime.run.requests import ImageRequest
from tests.equivalence import assert_workers_equal_emulation, pixels

FLUX = "builtin:tiny-flux"
QWEN = "builtin:tiny-qwen-image"
#: Short, and the window opens at step 3 (the cap), so every run goes through every phase.
FLUX_SCHEDULE = Schedule(steps=8, guidance_scale=4.0, L=2, g_slope=4e-4, tau_cap=3, k=2)


@pytest.fixture(scope="module")
def flux():
    pipe = load_pipeline(FLUX)
    return trace_pipeline(pipe, call=lambda: example_call(pipe, 128, 128, max_sequence_length=32))


def test_flux_graph_is_the_models_own_forward_at_any_row_count(flux):
    """The graph traced on a one-row call computes the transformer bit for bit, on one row and
    on three, and its nodes are the model's blocks."""
    (args, kwargs), = capture_denoiser_calls(flux.pipe, 128, 128, max_sequence_length=32)
    modules = [n.target for n in flux.graph.graph.nodes if n.op == "call_module"]
    assert "transformer_blocks.0" in modules and "single_transformer_blocks.3" in modules and "proj_out" in modules
    inputs = flux.adapter.inputs_from_call(*args, **kwargs)
    runner = GraphRunner(flux.graph)
    program = runner.program([n.name for n in flux.graph.graph.nodes if n.op != "placeholder"])
    with torch.inference_mode():
        for rows in (1, 3):
            given = repeat_rows(inputs, rows)
            given["hidden_states"] = torch.randn(given["hidden_states"].shape, generator=torch.Generator().manual_seed(rows))
            expected = flux.denoiser(*args, **{**kwargs, **given})[0]
            assert torch.equal(runner.run(program, given)["output"], expected)


def test_flux_call_with_other_constants_is_refused(flux):
    (args, kwargs), = capture_denoiser_calls(flux.pipe, 128, 128, max_sequence_length=32)
    with pytest.raises(HybridiffError, match="joint_attention_kwargs"):
        flux.adapter.inputs_from_call(*args, **{**kwargs, "joint_attention_kwargs": {"scale": 0.5}})


def test_two_call_pairing_refuses_a_pipeline_calling_once_per_step():
    pairing = BranchPairing("hidden_states", "timestep")
    x = torch.zeros(1, 4, 2)
    assert pairing.add({"hidden_states": x, "timestep": torch.tensor([1.0])}) is None
    with pytest.raises(HybridiffError, match="two calls per step"):
        pairing.add({"hidden_states": x, "timestep": torch.tensor([0.5])})
    pairing.add({"hidden_states": x, "timestep": torch.tensor([0.5])})
    with pytest.raises(HybridiffError, match="no unconditional partner"):
        pairing.check_done()


@pytest.mark.parametrize("gpus, mesh", [(2, "dp=1,cfg=2,pp=1"), (4, "dp=1,cfg=2,pp=2,sp=2")])
def test_flux_true_cfg_runs_equal_emulation(gpus, mesh, tmp_path):
    """FluxPipeline unmodified, true CFG (two transformer calls per step): the workers equal
    the emulation byte for byte, through warm-up, window and fully-connecting steps. The mesh
    is named: on 2 devices cfg=2 and cfg=1,sp=2 are predicted within noise of each other."""
    plan = compile_model(FLUX, gpus=gpus, schedule=FLUX_SCHEDULE, repeats=1, threads=1, cost="flops", mesh=mesh)
    assert plan.mesh.cfg == 2 and plan.model.denoiser == "flux"
    path = tmp_path / "plan.json"
    plan.save(path)
    hybrid, _ = assert_workers_equal_emulation(path, tmp_path, [ImageRequest("a red cube", None, 1)])
    image = hybrid["images"][0]
    assert image["tau1"] == FLUX_SCHEDULE.tau_cap and "window" in image["phases"]
    assert all(d is not None and d > 0 for p, d in zip(image["phases"], image["discrepancy"]) if p != "window")


def test_flux_hybrid_is_exact_until_the_window_and_the_rule_opens_it(tmp_path):
    """Condition partitioning with two-call guidance is exact: with no window the emulated
    plan gives the stock pipeline's image bit for bit. With the cap out of reach the
    discrepancy rule (tau1) opens the window on its own, from the same curve the stock
    pipeline's predictions give."""
    from hybridiff.runtime.run.session import RunOptions, execute

    request = (ImageRequest("a red cube", None, 2),)

    def run(mode: str, **schedule: int) -> dict:  # one device per branch: no token split's float order
        plan = compile_model(
            FLUX, gpus=2, schedule=FLUX_SCHEDULE.model_copy(update=schedule), repeats=1, threads=1, cost="flops",
            mesh="dp=1,cfg=2,pp=1,sp=1",
        )
        plan.save(tmp_path / f"{mode}{schedule}.json")
        return execute(RunOptions(plan=tmp_path / f"{mode}{schedule}.json", requests=request, out=tmp_path / mode, mode=mode, threads=1))

    serial, exact = run("serial", tau_cap=20, L=8)["images"][0], run("emulate", tau_cap=20, L=8)["images"][0]
    assert exact["phases"] == ["warm-up"] * FLUX_SCHEDULE.steps
    assert np.array_equal(pixels(tmp_path / "emulate"), pixels(tmp_path / "serial"))
    assert exact["discrepancy"] == serial["discrepancy"]
    ruled = run("emulate", tau_cap=20, L=2)["images"][0]
    assert ruled["tau1"] is not None and ruled["tau1"] < FLUX_SCHEDULE.steps
    assert ruled["discrepancy"][: ruled["tau1"] + 1] == serial["discrepancy"][: ruled["tau1"] + 1]


def test_wan_video_on_workers_equals_emulation(tmp_path):
    """WanPipeline unmodified (5-D latents, two calls per step): a 2-worker torchrun run of 5
    frames equals the emulation bit for bit, through the window."""
    from tests.test_api import _torchrun

    plan = compile_model("builtin:tiny-wan", gpus=2, schedule=FLUX_SCHEDULE, repeats=1, threads=1, cost="flops")
    assert plan.model.denoiser == "wan" and plan.model.guidance_calls == "two-calls"
    plan.save(tmp_path / "plan.json")
    result = _torchrun("video", str(tmp_path / "plan.json"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    workers = json.loads((tmp_path / "report.json").read_text())[0]
    pipe = load_pipeline("builtin:tiny-wan")
    with hybridiff.parallelize(pipe, tmp_path / "plan.json", emulate=True) as ppipe:
        emulated = ppipe(prompt="a red cube turning", generator=[torch.Generator("cpu").manual_seed(3)], output_type="pt")
        report = ppipe.last_report.replicas[0]
    assert torch.equal(torch.load(tmp_path / "video.pt"), emulated.frames) and emulated.frames.shape[1] == 5
    assert workers["phases"] == report.phases and "window" in report.phases and workers["discrepancy"] == report.discrepancy


def _family_plan(model: str, path: Path, **schedule: int) -> Path:
    """A 2-device plan of ``model`` with the short family schedule (changed by ``schedule``)."""
    compile_model(model, gpus=2, schedule=FLUX_SCHEDULE.model_copy(update=schedule), repeats=1, threads=1, cost="flops").save(path)
    return path


def _without_window(model: str, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of the stock pipeline and of the emulated plan with the window out of reach,
    two images; checks the plan ran whole steps only."""
    from hybridiff.runtime.run.session import RunOptions, execute

    plan, request = _family_plan(model, tmp_path / "exact.json", tau_cap=20, L=8), (ImageRequest("a red cube", None, 2),)
    runs = {m: execute(RunOptions(plan=plan, requests=request, out=tmp_path / m, mode=m, threads=1)) for m in ("serial", "emulate")}
    assert runs["emulate"]["images"][0]["phases"] == ["warm-up"] * FLUX_SCHEDULE.steps
    return pixels(tmp_path / "serial"), pixels(tmp_path / "emulate")


def test_qwen_image_true_cfg_runs_equal_emulation_and_stay_close_to_stock(tmp_path):
    """QwenImagePipeline unmodified (true CFG, text trimmed per prompt): the workers equal the
    emulation byte for byte through the window; with no window the image is the stock
    pipeline's within one level (both branches are padded under the mask to one length, a
    rounding-level change of the attention)."""
    plan = _family_plan(QWEN, tmp_path / "plan.json")
    assert load_plan(plan).model.denoiser == "qwen-image" and load_plan(plan).model.guidance_calls == "two-calls"
    hybrid, _ = assert_workers_equal_emulation(plan, tmp_path, [ImageRequest("a red cube", None, 1)])
    assert "window" in hybrid["images"][0]["phases"]
    stock, emulated = _without_window(QWEN, tmp_path)
    assert np.abs(stock.astype(int) - emulated.astype(int)).max() <= 1


def test_qwen_image_text_longer_than_traced_is_refused():
    pipe = load_pipeline(QWEN)
    model = trace_pipeline(pipe, call=lambda: example_call(pipe, 256, 256, max_sequence_length=16))
    (args, kwargs), = capture_denoiser_calls(pipe, 256, 256, prompt="a red cube " * 20, max_sequence_length=128)
    with pytest.raises(HybridiffError, match="max_sequence_length <= the plan's"):
        model.adapter.inputs_from_call(*args, **kwargs)


def test_diffusers_ulysses_refuses_heads_it_cannot_split():
    from diffusers import FluxTransformer2DModel

    from hybridiff.runtime.execution.context_parallel import enable_ulysses

    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=3, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), in_channels=16)
    with pytest.raises(HybridiffError, match="FluxTransformer2DModel's 3 heads do not divide among 2 workers"):
        enable_ulysses(model, 2)


def test_sana_batched_cfg_runs_equal_emulation_and_stock(tmp_path):
    """SanaPipeline unmodified (batched [uncond; cond] CFG, linear attention, a deep-compression
    autoencoder): the workers equal the emulation byte for byte through the window, and with no
    window the emulated plan gives the stock pipeline's image within one level (each branch runs
    as one row rather than two: the kernels round differently, as on SD3)."""
    plan = _family_plan("builtin:tiny-sana", tmp_path / "plan.json")
    assert load_plan(plan).model.denoiser == "sana" and load_plan(plan).model.guidance_calls == "batched"
    hybrid, _ = assert_workers_equal_emulation(plan, tmp_path, [ImageRequest("a red cube", None, 1)])
    assert "window" in hybrid["images"][0]["phases"]
    stock, emulated = _without_window("builtin:tiny-sana", tmp_path)
    assert np.abs(stock.astype(int) - emulated.astype(int)).max() <= 1
