"""Strategies measured side by side: latency, traffic and fidelity, next to each plan's prediction.

Every entry is a plan the runtime executes: the serial baseline (the stock pipeline on one
worker) and each strategy of ``hybridiff.compiler.strategies``, or, for ``bench PLAN``, that
plan against serial. All of them generate the same requests with the same threads per worker,
each in freshly launched workers, so none inherits another's threads. ``peer_entries`` adds peers
run by other projects' own code on the same workers: diffusers' context parallelism (Ulysses
over every worker, ``runtime.execution.context_parallel``), which the simulator does not
model, so its prediction columns are empty. The entries alternate
for ``rounds`` rounds, so a slow spell of a shared machine falls on all of them; the median
of all runs counts. Every run is traced (``hybridiff.runtime.spans``, about a microsecond per
span), which gives the per-step breakdown. Each entry's images and report stay in its own
folder, and fidelity is measured against the serial entry's images. The result is a ratio from
one run on one machine; it is never asserted in a test.

Every entry runs eagerly or compiled (``graph.compiled``); ``--execution both`` runs each
twice, the compiled one labelled so, and with it the serial baseline both ways: a speed-up is
measured against the eager serial entry (``speedup_vs``), and ``speedups`` holds it against
every serial entry, so a compiled hybrid run is also compared with a compiled stock pipeline.
A compiled entry's prediction comes from a plan costed compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hybridiff import load
from hybridiff.compiler.costing import CostedModel
from hybridiff.compiler.options import CompileOptions
from hybridiff.compiler.search import plan_for
from hybridiff.compiler.strategies import WINDOWED
from hybridiff.errors import HybridiffError
from hybridiff.files import strict_json, write_atomic
from hybridiff.models import TRAINED
from hybridiff.plan import Plan, Schedule, StepCosts, load_plan
from hybridiff.runtime.launch.launcher import launch_local
from hybridiff.runtime.run.requests import ImageRequest, expand, read_prompts
from hybridiff.runtime.run.session import RunOptions
from hybridiff.simulate import Workload, serial_latency, simulate
from hybridiff.zoo.digits import PROMPTS as DIGIT_PROMPTS


@dataclass(frozen=True)
class Entry:
    """One column of the comparison: a plan, how it runs, where its images go."""

    label: str
    strategy: str
    plan_path: Path
    folder: Path
    #: Workers of a peer entry (diffusers' Ulysses runs on as many as it is given).
    world: int | None = None
    #: "eager" or "compiled"; None: the plan's.
    execution: str | None = None

    @property
    def mode(self) -> str:
        return {"serial": "serial", ULYSSES: "ulysses"}.get(self.strategy, "hybrid")

    @property
    def workers(self) -> int:
        if self.world is not None:
            return self.world
        return 1 if self.mode == "serial" else load_plan(self.plan_path).mesh.world_size


#: The peer strategy run by diffusers' own context parallelism.
ULYSSES = "diffusers-ulysses"
PEERS = (ULYSSES,)
#: The families of hybridiff whose diffusers models carry a context-parallel plan (``_cp_plan``).
ULYSSES_FAMILIES = ("flux", "qwen-image", "wan")


@dataclass(frozen=True)
class BenchOptions:
    requests: tuple[ImageRequest, ...]
    steps: int | None
    repeats: int
    rounds: int
    threads: int
    #: Score images as digits (accuracy and digit FID): the trained digit models.
    digits: bool = False


#: What a compiled entry's label and folder end with.
COMPILED_LABEL, COMPILED_FOLDER = " (compiled)", "-compiled"


def executions_of(text: str | None) -> Sequence[str | None]:
    """``--execution``: eager, compiled, both, or None (the plan's)."""
    if text not in (None, "eager", "compiled", "both"):
        raise HybridiffError(f"--execution {text!r}: use 'eager', 'compiled' or 'both'")
    return ["eager", "compiled"] if text == "both" else [text]


def _named(label: str, execution: str | None, out: Path) -> tuple[str, Path]:
    """An entry's label and folder: compiled ones say so."""
    compiled = execution == "compiled"
    folder = label.replace(" k=", "-k") + (COMPILED_FOLDER if compiled else "")
    return label + (COMPILED_LABEL if compiled else ""), out / folder


def plan_entries(plan_path: Path, out: Path, executions: Sequence[str | None] = (None,)) -> list[Entry]:
    """``bench PLAN``: the plan against the stock pipeline, in each of ``executions``."""
    entries = []
    for strategy in ("serial", "hybrid"):
        for execution in executions:
            label, folder = _named(strategy, execution, out)
            entries.append(Entry(label, strategy, plan_path, folder, execution=execution))
    return entries


def strategy_entries(
    costed: CostedModel, gpus: int, schedule: Schedule, strategies: list[str], ks: list[int], out: Path,
    batch: int = 1, warmup: int | None = None,
) -> list[Entry]:
    """Plan every strategy (the windowed ones at every ``k``) from one costed model, written
    to ``out/<label>/plan.json``, run as the model was costed (eager or compiled); serial
    comes first whether asked for or not."""
    entries = []
    execution = costed.execution
    for strategy in ["serial", *(s for s in strategies if s != "serial")]:
        for k in ks if strategy in WINDOWED else [schedule.k]:
            label, folder = _named(f"{strategy} k={k}" if strategy in WINDOWED and len(ks) > 1 else strategy, execution, out)
            windowed = schedule.model_copy(update={"k": k})
            options = CompileOptions(gpus=gpus, schedule=windowed, batch=batch, strategy=strategy, warmup=warmup, execution=execution)
            plan_for(costed, options).save(folder / "plan.json")
            entries.append(Entry(label, strategy, folder / "plan.json", folder, execution=execution))
    return entries


def parse_peers(text: str) -> list[str]:
    """``"diffusers-ulysses"`` as peer names, or a one-line error naming the known ones."""
    peers = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise HybridiffError(f"--peers {text!r}: unknown {unknown}; choose from {', '.join(PEERS)}")
    return peers


def peer_entries(peers: list[str], entries: list[Entry], gpus: int, out: Path) -> list[Entry]:
    """``entries`` and each of ``peers`` on ``gpus`` workers, run from the serial entry's plan
    (the model, its dtype and schedule; the peer parallelises by its own rules)."""
    if peers and gpus < 2:
        raise HybridiffError("a peer strategy needs at least 2 devices; raise --gpus")
    serial = next(e for e in entries if e.strategy == "serial")
    family = load_plan(serial.plan_path).model.denoiser
    if peers and family not in ULYSSES_FAMILIES:
        raise HybridiffError(
            f"diffusers' context parallelism has no plan for {family} models; the peer runs {', '.join(ULYSSES_FAMILIES)}"
        )
    return entries + [Entry(p, p, serial.plan_path, out / p, world=gpus) for p in peers]


def _background_load(entries: list[Entry], opts: BenchOptions) -> tuple[float | None, str | None]:
    """Before a round: how busy other work keeps the cores, and the warning where the round's
    workers would not find enough of them free."""
    busy = load.busy_cores()
    return busy, load.load_warning(busy, max(e.workers for e in entries) * opts.threads, "this bench")


def run_bench(entries: list[Entry], opts: BenchOptions, out: Path) -> dict[str, Any]:
    """Measure every entry, score it against serial, write ``out/bench.json``; returns it."""
    runs: dict[str, list[float]] = {e.label: [] for e in entries}
    reports: dict[str, dict[str, Any]] = {}
    busy: list[float | None] = []
    warned = False
    for _ in range(opts.rounds):
        now, warning = _background_load(entries, opts)
        if warning and not warned:
            print(warning, file=sys.stderr)  # once: the figure of every round is in bench.json
            warned = True
        busy.append(now)
        for entry in entries:
            launch_local(
                RunOptions(
                    plan=entry.plan_path, requests=opts.requests, out=entry.folder, mode=entry.mode, steps=opts.steps,
                    threads=opts.threads, repeats=opts.repeats, trace=entry.folder / "trace", execution=entry.execution,
                ),
                entry.workers,
            )
            reports[entry.label] = json.loads((entry.folder / "report.json").read_text())
            runs[entry.label] += _denoise_runs(reports[entry.label])
    serials = [e for e in entries if e.strategy == "serial"]
    result = {
        "images": len(opts.requests),
        "steps": reports[serials[0].label]["steps"],
        "threads": opts.threads,
        #: Cores other processes kept busy before each round (``hybridiff.load``).
        "background_busy_cores": busy,
        "entries": [_entry_result(e, runs, reports, serials, opts) for e in entries],
    }
    write_atomic(out / "bench.json", strict_json(result))
    return result


def _denoise_runs(report: dict[str, Any]) -> list[float]:
    """Each repeat's denoising time: per replica its calls of that repeat summed, the slowest
    replica counting (as ``totals.denoise_s`` does with medians)."""
    calls = {(image["replica"], image["call"]): image["latency_runs_s"] for image in report["images"]}
    per_replica: dict[int, list[float]] = {}
    for (replica, _), call_runs in calls.items():
        summed = per_replica.setdefault(replica, [0.0] * len(call_runs))
        per_replica[replica] = [a + b for a, b in zip(summed, call_runs)]
    return [max(column) for column in zip(*per_replica.values())]


def predict(plan: Plan, mode: str, images: int, steps: int, tau1: int | None = None, step_costs: bool = True) -> float:
    """The simulator's latency for ``images`` run as ``mode`` (serial: the plan's batch per
    call), the window starting after ``tau1`` (default: the plan's tau_cap, as the compiler
    assumes); without ``step_costs``, compute and links alone: the plan's analytic bound."""
    schedule = plan.schedule.model_copy(update={"steps": steps, **({"tau_cap": tau1} if tau1 is not None else {})})
    work = Workload.from_plan(plan)
    if not step_costs:
        work = dataclasses.replace(work, step_costs=StepCosts())
    if mode == "serial":
        calls = [min(plan.mesh.batch, images - i) for i in range(0, images, plan.mesh.batch)]
        return sum(serial_latency(work, schedule, n) for n in calls)
    return simulate(plan.mesh, work, schedule, images).latency_s


def _entry_result(
    entry: Entry, runs: dict[str, list[float]], reports: dict[str, dict[str, Any]], serials: list[Entry], opts: BenchOptions
) -> dict[str, Any]:
    """One entry's measured and predicted numbers, its bound and its fidelity against serial:
    measured against the first serial entry (eager), predicted against the serial entry run
    as this one is (eager or compiled), whose plan was costed alike."""
    plan, report = load_plan(entry.plan_path), reports[entry.label]
    images, steps = len(report["images"]), report["steps"]
    serial = serials[0]
    alike = next((s for s in serials if report["execution"] == reports[s.label]["execution"]), serial)
    measured = statistics.median(runs[entry.label])
    speedups = {s.label: statistics.median(runs[s.label]) / measured for s in serials}
    serial_plan = load_plan(alike.plan_path)
    tau1 = _tau1(report)  # where the rule opened the window in this run, not where the compiler assumed
    speedup = speedups[serial.label]
    modelled = entry.mode != "ulysses"  # the simulator models hybridiff's own programs only
    predicted = predict(plan, entry.mode, images, steps, tau1) if modelled else None
    predicted_speedup = predict(serial_plan, "serial", images, steps) / predicted if modelled else None
    bound = None
    if modelled:
        bound = predict(serial_plan, "serial", images, steps, step_costs=False) / predict(plan, entry.mode, images, steps, tau1, False)
    return {
        "label": entry.label,
        "strategy": entry.strategy,
        "k": plan.schedule.k if entry.mode == "hybrid" and plan.schedule.k else None,  # what ran: no window, no k
        "mesh": report["mesh"] if entry.mode == "ulysses" else "1 device" if entry.mode == "serial" else plan.mesh.label,
        "folder": str(entry.folder),
        "tau1": tau1,
        "latency_s": statistics.median(t for image in _calls(report) for t in image["latency_runs_s"]),
        "denoise_s": measured,
        "runs_s": runs[entry.label],
        "images_per_s": images / measured,
        "execution": report["execution"],
        "speedup": speedup,
        "speedup_vs": serial.label,
        "speedups": speedups,
        "predicted_s": predicted,
        "predicted_vs": alike.label,
        "predicted_speedup": predicted_speedup,
        "speedup_error": predicted_speedup / speedups[alike.label] - 1 if modelled else None,
        "bound": bound,
        "of_bound": speedups[alike.label] / bound if modelled else None,
        "comm_bytes_per_image": report["totals"]["comm_bytes"] / images,
        **_fidelity(entry, serial, opts.digits),
        "profile_ms": report.get("profile_ms", {}),
    }


def _tau1(report: dict[str, Any]) -> int | None:
    """The median step after which the run's calls opened their window (None: no window)."""
    tau1s = [call["tau1"] for call in _calls(report) if call["tau1"] is not None]
    return statistics.median_low(tau1s) if tau1s else None


def _calls(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One image entry per pipeline call (its latency is the call's)."""
    return list({(i["replica"], i["call"]): i for i in report["images"]}.values())


def _fidelity(entry: Entry, serial: Entry, digits: bool) -> dict[str, Any]:
    """PSNR and SSIM against the serial images; digit accuracy and FID for the digit models."""
    from hybridiff.fidelity import compare_runs

    scores = compare_runs(entry.folder, serial.folder)
    psnr = scores["psnr_mean"]  # over the images that differ; infinite when none does
    result: dict[str, Any] = {
        "psnr": None if math.isinf(psnr) else psnr,
        "identical_images": scores["identical"],
        "ssim": scores["ssim_mean"],
    }
    if digits:
        from hybridiff.zoo.evaluate import digit_accuracy, digit_fid

        fid = digit_fid(entry.folder)
        result.update(digit_accuracy=digit_accuracy(entry.folder)["accuracy"], digit_fid=fid["fid"], digit_fid_real=fid["real_fid"])
    return result


def is_digit_model(source: str) -> bool:
    """Whether ``source`` is a trained digit model, whose images digit accuracy and FID score."""
    return source.removeprefix("builtin:") in TRAINED


def requests_for(
    source: str, prompt: str, prompts: Path | None, per_prompt: int | None, batch: int
) -> tuple[ImageRequest, ...]:
    """What every entry generates: a prompts file; else the digit models' ten digits (two
    images each by default); else ``prompt`` with seeds ``0 .. batch-1``."""
    if prompts is not None:
        return tuple(expand(read_prompts(prompts, 0, None), per_prompt or 1))
    if is_digit_model(source):
        return tuple(expand([ImageRequest(p, None, 0) for p in DIGIT_PROMPTS], per_prompt or 2))
    return tuple(expand([ImageRequest(prompt, None, 0)], per_prompt or batch))


def model_entries(
    model: str, gpus: int, schedule: Schedule, strategies: list[str], ks: list[int], batch: int,
    warmup: int | None, threads: int, calibrate: bool, out: Path, executions: Sequence[str | None] = (None,),
) -> list[Entry]:
    """Cost ``model`` once per execution (calibrated, as ``compile`` does) and plan every
    strategy from it; the serial entries first."""
    from hybridiff.calibrate import calibration
    from hybridiff.compiler.entries import cost_model

    entries = []
    for execution in executions:
        options = CompileOptions(gpus=gpus, schedule=schedule, batch=batch, threads=threads, execution=execution or "eager")
        costed = cost_model(model, options, calibrate=calibration(calibrate, threads))
        entries += strategy_entries(costed, gpus, schedule, strategies, ks or [schedule.k], out, batch, warmup)
    return sorted(entries, key=lambda e: e.strategy != "serial")
