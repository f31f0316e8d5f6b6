"""Step programs as text, for people: ``hybridiff simulate PLAN --program``.

A call's programs are listed in the order the call first runs them, with the steps that run
each, as the simulator walks the call (the window opening at ``tau_cap``). Each action is one
line naming the positions that take part (replica d's position s is rank ``Mesh.rank(d, s)``),
so a rank's own list is the lines naming its position."""

from __future__ import annotations

from hybridiff.plan import Schedule
from hybridiff.program.actions import StepProgram
from hybridiff.program.build import ProgramBuilder
from hybridiff.program.timeline import CallSchedule


def call_programs(builder: ProgramBuilder, schedule: Schedule, rows: int) -> list[tuple[str, StepProgram]]:
    """The distinct programs of one call of ``rows`` rows, in order of first use, each with a
    label saying when it runs (its steps, or "after step i" for the hand-off)."""
    timeline = CallSchedule(builder, schedule, schedule.steps, rows)
    steps: dict[int, list[int]] = {}  # programs are built once per kind (cached): keyed by identity
    programs: dict[int, StepProgram] = {}
    labels: dict[int, str] = {}
    for step in range(schedule.steps):
        program = timeline.program(step)
        programs.setdefault(id(program), program)
        steps.setdefault(id(program), []).append(step)
        if program.returns == "predictions" and (hand_off := timeline.observe(step, None)) is not None:
            programs[id(hand_off)] = hand_off
            labels[id(hand_off)] = f"after step {step}"
    return [(labels.get(key) or _steps(steps[key]), program) for key, program in programs.items()]


def render(program: StepProgram, when: str) -> str:
    """``program`` as a numbered list of actions, each naming the positions taking part."""
    about = ", ".join(k.replace("_", " ") + ("" if v is True else f" {v}") for k, v in program.about.items() if v not in (False, None))
    returns = f"; returns {program.returns}" if program.returns else ""
    lines = [f"{program.kind} ({about}), {when}{returns}"]
    for i, action in enumerate(program.actions, 1):
        who = ",".join(map(str, action.positions))
        lines.append(f"  {i:>3}. position {who:<8} [{action.phase.value}] {action.describe()}")
    return "\n".join(lines)


def _steps(steps: list[int]) -> str:
    """``[0, 1, 2, 6]`` as "steps 0-2, 6"."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    return ("step " if len(steps) == 1 else "steps ") + ", ".join(parts)
