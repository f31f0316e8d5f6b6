"""Step programs (``hybridiff.program``) are what runs and what is costed: an emulated call
executes exactly the actions the programs of its steps list, in that order, each sending the
bytes the program says, and the simulator's traffic per phase is the run's."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache

import pytest
import torch

import hybridiff
from hybridiff.compiler.entries import compile_model
from hybridiff.models import load_pipeline
from hybridiff.plan import Plan, Schedule, load_plan
from hybridiff.program.actions import Action, JoinShards, Post, ShardForward
from hybridiff.program.build import ProgramBuilder
from hybridiff.program.layout import Layout
from hybridiff.program.timeline import CallSchedule
from hybridiff.simulate import Workload, simulate

#: The window opens at tau_cap (step 2: the slope rule cannot fire first), runs steps 3..5,
#: and step 6 is fully connected again: every kind of program in 7 steps.
SCHEDULE = Schedule(steps=7, guidance_scale=5.0, L=1, g_slope=1e-12, tau_cap=2, k=3)

# The meshes of the equivalence suite: cfg 1 and 2, pp 1-3, dp > 1, sp = 2 over tokens and bands.
CASES = [
    ("builtin:tiny-sdxl", 2, "dp=1,cfg=2,pp=1", 1, {}),
    ("builtin:tiny-sdxl", 2, "dp=1,cfg=1,pp=2", 2, {}),
    ("builtin:tiny-sdxl", 2, "dp=1,cfg=1,pp=2", 1, {"guidance_scale": 1.0}),  # cfg=1 without guidance
    ("builtin:tiny-sdxl", 3, "dp=1,cfg=1,pp=3", 2, {}),
    ("builtin:tiny-sdxl", 4, "dp=1,cfg=2,pp=2", 3, {}),
    ("builtin:tiny-sdxl", 4, "dp=1,cfg=2,pp=2", 1, {"window_guidance": "cached"}),
    ("builtin:tiny-sdxl", 4, "dp=2,cfg=2,pp=1", 3, {}),
    ("builtin:tiny-sdxl", 2, "dp=1,cfg=1,pp=2", 1, {"k": 10}),  # the window runs to the last step
    ("builtin:digits-sd3", 4, "dp=1,cfg=2,pp=2,sp=2", 1, {}),  # token shards
    ("builtin:tiny-sd3", 2, "dp=1,cfg=1,pp=2,sp=2", 1, {}),
    ("builtin:digits-sdxl", 4, "dp=1,cfg=2,pp=2,sp=2", 1, {}),  # band shards
]


@lru_cache(maxsize=None)
def _pipeline(model: str):
    return load_pipeline(model)


def _programmed(plan: Plan, timeline: CallSchedule) -> list[Action]:
    """The actions of a call as the programs list them, rebuilt from the plan alone and the
    call's discrepancy curve: each step's program, and the hand-off where the window opens."""
    replay = CallSchedule(ProgramBuilder(Layout.of(plan)), plan.schedule, timeline.steps, timeline.rows)
    actions: list[Action] = []
    for step in range(timeline.steps):
        program = replay.program(step)
        actions += program.actions
        if program.returns == "predictions":
            hand_off = replay.observe(step, timeline.curve[step])
            actions += hand_off.actions if hand_off is not None else ()
    return actions


@pytest.mark.parametrize("model, devices, mesh, images, schedule", CASES)
def test_a_call_executes_its_step_programs_and_sends_what_they_say(model, devices, mesh, images, schedule):
    plan = compile_model(
        model, gpus=devices, schedule=SCHEDULE.model_copy(update=schedule), repeats=1, threads=1, cost="flops",
        mesh=mesh, batch=images,
    )
    assert plan.mesh.label == mesh
    pipe = _pipeline(model)
    with hybridiff.parallelize(pipe, plan, emulate=True) as ppipe:
        ppipe(
            prompt=[f"a handwritten digit {i}" for i in range(images)], num_inference_steps=plan.schedule.steps,
            guidance_scale=plan.schedule.guidance_scale, output_type="latent",
            generator=[torch.Generator().manual_seed(i) for i in range(images)],
        )
        stand_ins = [ppipe._stand_ins[d] for d in range(plan.mesh.dp) if ppipe._stand_ins[d].timeline is not None]
        measured: Counter[str] = Counter()
        for stand_in in stand_ins:
            executed = stand_in.executor.executed
            assert [action for action, _ in executed] == _programmed(plan, stand_in.timeline)
            for action, sent in executed:
                assert sent == action.bytes, action.describe()
                measured[action.phase.value] += sent
        report = ppipe.last_report

    kinds = {type(a) for s in stand_ins for a, _ in s.executor.executed}
    assert Post in kinds and (plan.mesh.sp == 1 or {ShardForward, JoinShards} <= kinds)
    reported = Counter()
    for replica in report.replicas:
        assert "window" in replica.phases
        reported.update(replica.comm_bytes_by_phase)
    assert reported == measured
    predicted = simulate(plan.mesh, Workload.from_plan(plan), plan.schedule, images)
    assert Counter(predicted.comm_bytes_by_phase) == reported


def test_simulate_prints_the_programs_it_costs(plan_path):
    """``simulate --program``: every step of the call under exactly one program, and the bytes
    the printed actions send, times the steps running them, are the simulator's total."""
    from typer.testing import CliRunner

    from hybridiff.cli import app

    printed = CliRunner().invoke(app, ["simulate", str(plan_path), "--program"])
    costed = CliRunner().invoke(app, ["simulate", str(plan_path), "--json"])
    assert printed.exit_code == costed.exit_code == 0, printed.output
    steps, total = [], 0
    for block in printed.output.strip().split("\n\n")[1:]:
        head, *lines = block.splitlines()
        when = head.split("), ")[1].split(";")[0]
        runs = [int(when.removeprefix("after step "))] if when.startswith("after") else _steps(when)
        steps += [] if when.startswith("after") else runs
        total += len(runs) * sum(int(m.group(1)) for line in lines if (m := re.search(r"(\d+) B\)$", line)))
    plan = load_plan(plan_path)
    assert sorted(steps) == list(range(plan.schedule.steps))
    assert f"hand-off (rows 2), after step {plan.schedule.expected_tau1}" in printed.output
    assert total == json.loads(costed.output)["comm_bytes"]


def _steps(when: str) -> list[int]:
    """"steps 1-6, 10" as [1, ..., 6, 10]."""
    found = []
    for part in when.split(" ", 1)[1].split(", "):
        first, _, last = part.partition("-")
        found += range(int(first), int(last or first) + 1)
    return found
