"""The runtime against its references: emulation, the stock pipeline, and hand-made staleness."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hybridiff.compiler.entries import compile_model, cost_model
from hybridiff.compiler.options import CompileOptions
from hybridiff.compiler.search import plan_for
from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.pipeline import trace_pipeline
from hybridiff.graph.rows import branch_inputs
from hybridiff.plan import Schedule, load_plan
from hybridiff.runtime.comm import shared
from hybridiff.runtime.comm.transport import LocalTransport
from hybridiff.runtime.execution.denoiser import HybridDenoiser
from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.runtime.run.session import RunOptions, execute
from hybridiff.simulate import Workload, simulate
from tests.conftest import MODEL, TEST_SCHEDULE, cli, invoke
from tests.equivalence import assert_workers_equal_emulation, pixels

PROMPT = "a red cube on a table"


def _in_process(plan_path, out, mode, requests=(ImageRequest(PROMPT, None, 3),), **options):
    return execute(RunOptions(plan=plan_path, requests=tuple(requests), out=out, mode=mode, threads=1, **options))


def test_two_workers_produce_exactly_the_emulated_image(plan_path, tmp_path):
    requests = [ImageRequest(PROMPT, None, 3)]  # tracing changes nothing:
    hybrid, emulated = assert_workers_equal_emulation(plan_path, tmp_path, requests, trace=tmp_path / "trace")
    image = hybrid["images"][0]
    assert "window" in image["phases"], "the test schedule must enter the window"
    assert hybrid["totals"] == {**emulated["totals"], "denoise_s": hybrid["totals"]["denoise_s"],
                                "images_per_s": hybrid["totals"]["images_per_s"]}
    # full steps: each branch's rank broadcasts one 4x32x32 float32 prediction to the other rank
    full_steps = len(image["phases"]) - image["phases"].count("window")
    by_phase = image["comm_bytes_by_phase"]
    assert by_phase["warm-up"] + by_phase["fully-connecting"] == full_steps * 2 * 1 * 4 * 32 * 32 * 4
    assert hybrid["mode"] == "hybrid" and hybrid["world_size"] == 2 and hybrid["mesh"] == "dp=1,cfg=2,pp=1"
    plan = load_plan(plan_path)
    assert image["tau1"] == plan.estimates.expected_tau1  # random weights: the rule falls back to tau_cap
    assert image["comm_bytes"] == plan.estimates.comm_bytes_per_image
    assert image["latency_s"] > 0 and image["phases"].count("window") == 3  # k
    _check_trace(hybrid, tmp_path / "trace")


def _check_trace(report, folder):
    """Each rank's trace shows every category of every step, and the report sums them up."""
    phases = report["images"][0]["phases"]
    for rank in ("0", "1"):
        trace = json.loads((folder / f"rank-{rank}.json").read_text())
        # two workers bound to a core each, on one machine: cut tensors move through shared memory
        assert trace["otherData"]["links"] == {"0->1": "shared memory", "1->0": "shared memory"} or not shared.supported()
        events = trace["traceEvents"]
        spans = [e for e in events if e.get("ph") == "X"]
        assert {e["cat"] for e in spans} >= {"step", "compute", "wait", "send-recv", "pipeline", "glue"}
        steps = [e for e in spans if e["cat"] == "step"]
        assert [e["name"] for e in steps] == [f"call 0 step {i} ({p})" for i, p in enumerate(phases)]
        assert all(e["dur"] >= 0 and set(e["args"]) == {"compute", "wait", "send-recv", "pipeline", "glue"} for e in steps)
        profile = report["profile_ms"][rank]
        assert set(profile) == set(phases) == {"warm-up", "window", "fully-connecting"}
        assert profile["warm-up"]["steps"] == phases.count("warm-up")
        assert profile["warm-up"]["median"]["compute"] > 0


# Every kind of mesh for 1, 2, 3, 4 and 8 devices; ``images`` > 1 splits rows across a group's
# devices outside the window and batches them inside it. More than 2 workers oversubscribe this
# machine's cores: these check correctness only.
MESHES = [
    (1, None, 1, 5.0),  # a single device: dp=1,cfg=1,pp=1
    (2, "dp=2,cfg=1,pp=1", 3, 5.0),  # pure data parallelism, 2 + 1 images
    (2, "dp=1,cfg=1,pp=2", 2, 5.0),  # both branches on every stage: exact guidance in the window
    (2, None, 2, 1.0),  # no guidance: cfg=1 pure stale-activation pipeline
    (3, None, 1, 5.0),  # odd: one group per branch, one device idle
    (3, "dp=1,cfg=1,pp=3", 2, 5.0),  # odd: three stages over the whole batch
    (4, "dp=1,cfg=2,pp=2", 3, 5.0),  # two devices per branch, 3 images split 2 + 1
    (4, "dp=2,cfg=2,pp=1", 2, 5.0),
    (8, "dp=2,cfg=2,pp=2", 2, 5.0),  # 8 workers on 2 cores: one image per replica keeps it short
]


@pytest.mark.parametrize("devices, mesh, images, guidance", MESHES)
def test_every_mesh_produces_exactly_the_emulated_images(devices, mesh, images, guidance, tmp_path):
    schedule = TEST_SCHEDULE.model_copy(update={"guidance_scale": guidance})
    plan = compile_model(MODEL, gpus=devices, schedule=schedule, repeats=1, threads=1, cost="flops", mesh=mesh, batch=images)
    if mesh:
        assert plan.mesh.label == mesh
    hybrid = _matches_emulation(plan, tmp_path, images)
    if plan.mesh.replica_size > 1:
        assert all("window" in image["phases"] for image in hybrid["images"])
    else:  # one stage has nothing to overlap: no window is planned, run or reported
        assert plan.schedule.k == 0 and all(set(i["phases"]) == {"warm-up"} and i["tau1"] is None for i in hybrid["images"])


# Each peer strategy is a plan the same runtime executes (issue #11). hybrid is the plan of the
# tests above, hybrid-cached that plan run with cached window guidance (below); tiny-sd3's
# pipeline strategy starts its window after step 0 (AsyncDiff's SD3 warm-up of 1 step).
STRATEGY_RUNS = [(MODEL, "cfg-parallel"), ("builtin:tiny-sd3", "pipeline")]


@pytest.mark.parametrize("model, strategy", STRATEGY_RUNS)
def test_every_strategy_produces_exactly_the_emulated_images(model, strategy, tmp_path):
    options = CompileOptions(schedule=TEST_SCHEDULE, repeats=1, threads=1, cost="flops")
    plan = plan_for(cost_model(model, options), options.but(strategy=strategy))
    hybrid = _matches_emulation(plan, tmp_path, 1)
    phases = hybrid["images"][0]["phases"]
    if strategy == "pipeline":  # whole steps for the warm-up, then the window to the last step
        assert phases == ["warm-up"] + ["window"] * (TEST_SCHEDULE.steps - 1)
        return
    # cfg-parallel: condition partitioning only, which is exact: the stock pipeline's image
    assert phases == ["warm-up"] * TEST_SCHEDULE.steps
    serial = _in_process(tmp_path / "plan.json", tmp_path / "serial", "serial", [ImageRequest(f"{PROMPT} 0", None, 0)])
    diff = np.abs(pixels(tmp_path / "hybrid") - pixels(tmp_path / "serial"))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}/255"
    assert hybrid["images"][0]["discrepancy"] == pytest.approx(serial["images"][0]["discrepancy"], rel=1e-4)


@pytest.mark.parametrize("strategy, k", [("hybrid", 1), ("hybrid", 3), ("pipeline", None)])
def test_an_image_does_not_depend_on_the_calls_before_it(strategy, k, tmp_path):
    """A window leaves nothing queued for the next call: the second of two calls draws exactly
    what it draws alone, whether the window is one step, mid-run, or runs to the last step."""
    schedule = TEST_SCHEDULE.model_copy(update={"k": k or TEST_SCHEDULE.k})
    options = CompileOptions(schedule=schedule, repeats=1, threads=1, cost="flops")
    plan = plan_for(cost_model("builtin:digits-sdxl", options), options.but(strategy=strategy))
    assert any(c.producer != plan.stages[-1].index for c in plan.cut_tensors), "needs a stage that reads another's cuts"
    plan.save(tmp_path / "plan.json")
    second = ImageRequest("a handwritten digit seven", None, 4)
    _in_process(tmp_path / "plan.json", tmp_path / "two", "emulate", [ImageRequest("a handwritten digit three", None, 3), second])
    _in_process(tmp_path / "plan.json", tmp_path / "alone", "emulate", [second])
    assert np.array_equal(pixels(tmp_path / "two", 1), pixels(tmp_path / "alone", 0))


def _matches_emulation(plan, tmp_path, images):
    """``plan`` on its workers equals its emulation for ``images`` prompts, and the simulator
    predicts the traffic exactly (the window starts at tau_cap here). Returns the workers' report."""
    plan.save(tmp_path / "plan.json")
    requests = [ImageRequest(f"{PROMPT} {i}", None, i) for i in range(images)]
    hybrid, _ = assert_workers_equal_emulation(tmp_path / "plan.json", tmp_path, requests)
    assert hybrid["world_size"] == plan.mesh.world_size
    predicted = simulate(plan.mesh, Workload.from_plan(plan), plan.schedule, images)
    assert hybrid["totals"]["comm_bytes_by_phase"] == predicted.comm_bytes_by_phase
    return hybrid


def test_a_prompts_file_gives_one_image_and_report_entry_per_request(plan, tmp_path):
    batched = compile_model(MODEL, schedule=TEST_SCHEDULE, repeats=1, threads=1, cost="flops", batch=2)
    batched.save(tmp_path / "plan.json")
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a red cube"},
        {"prompt": "a blue ball", "seed": 11},
        {"prompt": "a green cone", "negative_prompt": "blurry"},
        {"prompt": "a white tree", "seed": 5, "negative_prompt": "dark"},
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["--prompts", str(prompts), "--num-images-per-prompt", "2", "--seed", "100", "--threads", "1"]
    result = cli("run", str(tmp_path / "plan.json"), *args, "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["index"] for e in report["images"]] == list(range(8))
    assert [(e["prompt"], e["seed"]) for e in report["images"]] == [
        ("a red cube", 100), ("a red cube", 101), ("a blue ball", 11), ("a blue ball", 12),
        ("a green cone", 100), ("a green cone", 101), ("a white tree", 5), ("a white tree", 6),
    ]
    assert [e["negative_prompt"] for e in report["images"]][4:] == ["blurry", "blurry", "dark", "dark"]
    assert all((tmp_path / "out" / f"image-{i}.png").is_file() for i in range(8))
    assert report["totals"]["images"] == 8 and report["totals"]["calls"] == 4  # 2 images per call
    assert report["totals"]["comm_bytes"] == sum(e["comm_bytes"] for e in report["images"][::2])
    # The same request alone gives the same image: batching shares steps, not randomness.
    single = _in_process(tmp_path / "plan.json", tmp_path / "single", "emulate", [ImageRequest("a blue ball", None, 12)])
    diff = np.abs(pixels(tmp_path / "single") - pixels(tmp_path / "out", 3))
    assert single["images"][0]["seed"] == 12 and diff.max() <= 2, diff.max()


def test_cached_window_guidance_runs_distributed_like_its_emulation(plan_path, tmp_path):
    requests = [ImageRequest(PROMPT, None, 3)]
    hybrid, emulated = assert_workers_equal_emulation(plan_path, tmp_path, requests, window_guidance="cached")
    assert hybrid["window_guidance"] == emulated["window_guidance"] == "cached"
    assert "window" in hybrid["images"][0]["phases"]


def test_a_split_branch_plan_refuses_an_unguided_run(plan_path, tmp_path):
    with pytest.raises(HybridiffError, match="splits the guidance branches"):
        _in_process(plan_path, tmp_path / "out", "emulate", guidance_scale=1.0)
    assert not (tmp_path / "out").exists()


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
    denoiser = HybridDenoiser(traced, plan, LocalTransport(plan.mesh.replica_ranks(0)))
    counting = _CountingRunner(traced.graph)
    denoiser.executor.runner = counting
    denoiser.begin_call(guided=True)
    # what the denoiser reads of the pipeline calling it: how many steps the call makes
    pipe = SimpleNamespace(**{traced.attr: traced.denoiser, "_num_timesteps": schedule.steps})

    args, kwargs = unet_call
    kwargs = {**kwargs, "return_dict": False}
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randn(args[0].shape, generator=gen) for _ in range(schedule.steps)]
    outputs = []
    with torch.inference_mode(), denoiser.installed(pipe):
        for x in samples:
            outputs.append(denoiser(x, args[1], *args[2:], **kwargs)[0])

    # Reference: stage s runs on its window branch (its rank's branch when "mixed", the
    # conditional one when "cached") with the cut tensors every other stage produced one step
    # earlier (on the first window step: from tau1's full forward of that branch).
    ref = GraphRunner(traced.graph)
    full = ref.program([n.name for n in traced.graph.graph.nodes if n.op != "placeholder"], keep=[c.node for c in plan.cut_tensors])
    programs = [ref.program(s.recompute + s.nodes, keep=[c.node for c in plan.cut_tensors if c.producer == s.index]) for s in plan.stages]
    constants = {c.node: c.runtime_value() for c in plan.cut_tensors if c.constant is not None}
    owner = next(s.index for s in plan.stages if "output" in s.nodes)
    with torch.inference_mode():
        branches = [branch_inputs(traced.adapter.inputs_from_call(x, args[1], *args[2:], **kwargs), traced.adapter.latent) for x in samples]
        def window_branch(stage):
            return plan.mesh.branch_of(stage.index) if guidance == "mixed" else "cond"

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
    assert denoiser.timeline.tau1 == 1 and denoiser.timeline.tau2 == 4

    # No wasted forward: two full forwards per full step (one per branch, whatever the device
    # count); in the window every stage each step, except on the last window step, where only
    # the stage holding the output runs.
    n_full, sizes = len(full.nodes), [len(p.nodes) for p in programs]
    assert counting.runs == [n_full] * 4 + sizes * 2 + [sizes[owner]] + [n_full] * 2


def test_saved_model_folder_compiles_to_the_same_plan(tmp_path, plan):
    result = invoke("save-model", MODEL, str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    from_folder = compile_model(str(tmp_path / "model"), schedule=plan.schedule, repeats=2, threads=1, cost="flops")
    assert from_folder.model.source == str((tmp_path / "model").resolve())
    assert from_folder.graph == plan.graph
    assert [s.nodes for s in from_folder.stages] == [s.nodes for s in plan.stages]
    assert from_folder.cut_tensors == plan.cut_tensors


def test_bench_prints_measured_next_to_predicted_and_the_step_breakdown(plan_path, tmp_path):
    result = cli("bench", str(plan_path), "--rounds", "1", "--repeats", "1", "-o", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    serial, hybrid = bench["entries"]
    assert (serial["label"], hybrid["label"]) == ("serial", "hybrid") and hybrid["mesh"] == "dp=1,cfg=2,pp=1"
    for entry in (serial, hybrid):
        assert len(entry["runs_s"]) == 1 and entry["predicted_s"] > 0 and entry["bound"] > 0
    assert set(hybrid["profile_ms"]) == {"0", "1"} and set(serial["profile_ms"]) == {"0"}
    assert hybrid["comm_bytes_per_image"] == load_plan(plan_path).estimates.comm_bytes_per_image
    assert (tmp_path / "b" / "hybrid" / "image-0.png").is_file() and (tmp_path / "b" / "serial" / "image-0.png").is_file()
    assert "predicted (error)" in result.stdout and "| hybrid | 1 | window |" in result.stdout
