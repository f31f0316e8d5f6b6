"""The runtime against its references: emulation, the stock pipeline, and hand-made staleness."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hybridiff.compiler.compile import branch_inputs, compile_model, trace_pipeline
from hybridiff.execution import GraphRunner
from hybridiff.plan import Schedule, load_plan
from hybridiff.runtime.denoiser import HybridDenoiser
from hybridiff.runtime.session import RunOptions, execute
from hybridiff.runtime.transport import LocalTransport
from tests.conftest import MODEL, cli

PROMPT = "a red cube on a table"


def _pixels(folder):
    return np.asarray(Image.open(folder / "image-0.png"), dtype=np.int16)


def _hybrid(plan_path, out):
    result = cli("run", str(plan_path), "--prompt", PROMPT, "--seed", "3", "--threads", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return json.loads((out / "report.json").read_text())


def _in_process(plan_path, out, mode):
    return execute(RunOptions(plan=plan_path, prompt=PROMPT, out=out, mode=mode, seed=3, threads=1))


def test_two_workers_produce_exactly_the_emulated_image(plan_path, tmp_path):
    hybrid = _hybrid(plan_path, tmp_path / "hybrid")
    emulated = _in_process(plan_path, tmp_path / "emulate", "emulate")
    assert np.array_equal(_pixels(tmp_path / "hybrid"), _pixels(tmp_path / "emulate"))
    assert "pipeline" in hybrid["phases"], "the test schedule must enter the window"
    for key in ("tau1", "tau2", "phases", "discrepancy", "comm_bytes", "comm_bytes_by_phase", "steps", "plan_fingerprint"):
        assert hybrid[key] == emulated[key], key
    # full steps: each branch leader broadcasts one 4x32x32 float32 prediction to the other rank
    full_steps = hybrid["phases"].count("cond-partition")
    assert hybrid["comm_bytes_by_phase"]["cond-partition"] == full_steps * 2 * 1 * 4 * 32 * 32 * 4
    assert hybrid["comm_bytes_by_phase"]["pipeline"] > 0
    assert hybrid["mode"] == "hybrid" and hybrid["world_size"] == 2
    plan = load_plan(plan_path)
    if hybrid["tau1"] == plan.estimates.expected_tau1:
        assert hybrid["comm_bytes"] == plan.estimates.comm_bytes_per_image
    assert hybrid["latency_s"] > 0
    assert hybrid["phases"].count("pipeline") == 3  # k


@pytest.mark.parametrize("devices", [4, 8])
def test_more_workers_produce_exactly_the_emulated_image(plans_by_devices, devices, tmp_path):
    """Correctness only: 4 and 8 workers oversubscribe this machine's cores."""
    plans_by_devices[devices].save(tmp_path / "plan.json")
    hybrid = _hybrid(tmp_path / "plan.json", tmp_path / "hybrid")
    emulated = _in_process(tmp_path / "plan.json", tmp_path / "emulate", "emulate")
    assert np.array_equal(_pixels(tmp_path / "hybrid"), _pixels(tmp_path / "emulate"))
    assert hybrid["world_size"] == devices and "pipeline" in hybrid["phases"]
    for key in ("tau1", "tau2", "phases", "discrepancy", "comm_bytes", "comm_bytes_by_phase"):
        assert hybrid[key] == emulated[key], key
    if hybrid["tau1"] == plans_by_devices[devices].estimates.expected_tau1:
        assert hybrid["comm_bytes"] == plans_by_devices[devices].estimates.comm_bytes_per_image


def test_cached_window_guidance_runs_distributed_like_its_emulation(plan_path, tmp_path):
    args = ["--prompt", PROMPT, "--seed", "3", "--threads", "1", "--window-guidance", "cached"]
    result = cli("run", str(plan_path), *args, "-o", str(tmp_path / "hybrid"))
    assert result.returncode == 0, result.stderr
    assert cli("run", str(plan_path), *args, "--emulate", "-o", str(tmp_path / "emulate")).returncode == 0
    hybrid = json.loads((tmp_path / "hybrid" / "report.json").read_text())
    assert hybrid["window_guidance"] == "cached" and "pipeline" in hybrid["phases"]
    assert np.array_equal(_pixels(tmp_path / "hybrid"), _pixels(tmp_path / "emulate"))


def test_plan_without_window_matches_the_stock_pipeline(plan, tmp_path):
    no_window = plan.model_copy(update={"schedule": plan.schedule.model_copy(update={"k": 0})})
    no_window.save(tmp_path / "k0.json")
    hybrid = _hybrid(tmp_path / "k0.json", tmp_path / "hybrid")
    serial = _in_process(tmp_path / "k0.json", tmp_path / "serial", "serial")
    assert set(hybrid["phases"]) == {"cond-partition"}
    diff = np.abs(_pixels(tmp_path / "hybrid") - _pixels(tmp_path / "serial"))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}/255"
    assert hybrid["discrepancy"] == pytest.approx(serial["discrepancy"], rel=1e-4)


class _CountingRunner(GraphRunner):
    def __init__(self, gm):
        super().__init__(gm)
        self.runs = []

    def run(self, program, env):
        self.runs.append(len(program.nodes))
        return super().run(program, env)


@pytest.mark.parametrize("devices, guidance", [(2, "mixed"), (2, "cached"), (4, "mixed"), (4, "cached"), (8, "mixed")])
def test_window_uses_one_step_stale_cut_tensors(traced, unet_call, plans_by_devices, devices, guidance):
    """Drive the denoiser by hand and rebuild every step from the method's definition."""
    # tau1 = 1, window on steps 2..4
    schedule = Schedule(steps=6, guidance_scale=5.0, L=1, g_slope=1e-9, tau_cap=1, k=3, window_guidance=guidance)
    plan = plans_by_devices[devices].model_copy(update={"schedule": schedule})
    traced = trace_pipeline(traced.pipe, plan.graph.refined)
    denoiser = HybridDenoiser(traced, plan, LocalTransport(devices))
    counting = _CountingRunner(traced.graph)
    denoiser.runner = counting
    denoiser.begin_image(schedule.steps)

    args, kwargs = unet_call
    kwargs = {**kwargs, "return_dict": False}
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randn(args[0].shape, generator=gen) for _ in range(schedule.steps)]
    outputs = []
    with torch.inference_mode():
        for x in samples:
            outputs.append(denoiser(x, args[1], *args[2:], **kwargs)[0])

    # Reference: stage s runs on its window branch (its rank's branch when "mixed", the
    # conditional one when "cached") with the cut tensors every other stage produced one step
    # earlier (on the first window step: from tau1's full forward of that branch).
    ref = GraphRunner(traced.graph)
    full = ref.program([n.name for n in traced.graph.graph.nodes if n.op != "placeholder"], keep=[c.node for c in plan.cut_tensors])
    programs = [ref.program(s.recompute + s.nodes, keep=[c.node for c in plan.cut_tensors if c.producer == s.index]) for s in plan.stages]
    constants = {c.node: c.runtime_value for c in plan.cut_tensors if c.constant is not None}
    owner = next(s.index for s in plan.stages if "output" in s.nodes)
    with torch.inference_mode():
        branches = [branch_inputs(traced.adapter.inputs_from_call(x, args[1], *args[2:], **kwargs)) for x in samples]
        def window_branch(stage):
            return plan.mesh.branch_of(stage.rank) if guidance == "mixed" else "cond"

        stale, direction = None, None
        for step in range(schedule.steps):
            by_branch = dict(zip(("uncond", "cond"), branches[step]))
            if step in (2, 3, 4):
                produced, pred = {}, None
                for stage in plan.stages:
                    received = {c.node: stale[c.producer][c.node] for c in plan.cut_tensors
                                if c.constant is None and stage.index in c.consumers}
                    values = ref.run(programs[stage.index], {**by_branch[window_branch(stage)], **constants, **received})
                    produced[stage.index] = values
                    pred = values["output"] if stage.index == owner else pred
                stale = produced
                expected = torch.cat([pred, pred] if guidance == "mixed" else [pred - direction, pred])
            else:
                runs = {b: ref.run(full, by_branch[b]) for b in ("uncond", "cond")}
                stale = {s.index: runs[window_branch(s)] for s in plan.stages}
                direction = runs["cond"]["output"] - runs["uncond"]["output"]
                expected = torch.cat([runs["uncond"]["output"], runs["cond"]["output"]])
            assert torch.equal(outputs[step], expected), f"step {step}"
    assert denoiser.controller.tau1 == 1 and denoiser.controller.tau2 == 4

    # No wasted forward: two full forwards per full step (one per branch, whatever the device
    # count); in the window every stage each step, except on the last window step, where only
    # the stage holding the output runs.
    n_full, sizes = len(full.nodes), [len(p.nodes) for p in programs]
    assert counting.runs == [n_full] * 4 + sizes * 2 + [sizes[owner]] + [n_full] * 2


def test_saved_model_folder_compiles_to_the_same_plan(tmp_path, plan):
    result = cli("save-model", MODEL, str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    from_folder = compile_model(str(tmp_path / "model"), schedule=plan.schedule, repeats=2, threads=1, cost="flops")
    assert from_folder.model.source == str((tmp_path / "model").resolve())
    assert from_folder.graph == plan.graph
    assert [s.nodes for s in from_folder.stages] == [s.nodes for s in plan.stages]
    assert from_folder.cut_tensors == plan.cut_tensors
