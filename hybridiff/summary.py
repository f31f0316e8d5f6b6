"""What a plan says, for people (`hybridiff inspect`), for scripts (`--json`) and as a picture.

Everything here is read from the plan alone; nothing is loaded or re-measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hybridiff.files import write_atomic
from hybridiff.plan import Plan


def summary(plan: Plan) -> dict[str, Any]:
    """The machine-readable summary printed by ``hybridiff inspect --json``."""
    return {
        "model": plan.model.model_dump(),
        "fingerprint": plan.graph.fingerprint,
        "num_nodes": plan.graph.num_nodes,
        "refined": plan.graph.refined,
        "world_size": plan.mesh.world_size,
        "mesh": plan.mesh.model_dump(),
        "idle_ranks": plan.mesh.idle_ranks,
        "imbalance": plan.imbalance,
        "window_comm_bytes_per_step": plan.estimates.window_comm_bytes_per_step,
        "stages": [
            {
                "index": s.index,
                "ranks": [plan.mesh.rank(d, s.index) for d in range(plan.mesh.dp)],
                "branch": plan.mesh.branch_of(s.index),
                "cost": s.cost_s,
                "send_bytes": s.send_bytes,
                "nodes": s.nodes,
            }
            for s in plan.stages
        ],
        "cut_tensors": [c.model_dump() for c in plan.cut_tensors],
        "schedule": plan.schedule.model_dump(),
        "strategy": plan.strategy,
        "estimates": plan.estimates.model_dump(),
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def render_text(plan: Plan) -> str:
    """The human summary printed by ``hybridiff inspect``."""
    est, sch = plan.estimates, plan.schedule
    m = plan.model
    size = f" at {m.width}x{m.height}" if m.height else ""
    lines = [
        f"model      {m.source} ({m.denoiser}, {m.dtype}){size}",
        f"graph      {plan.graph.num_nodes} nodes, fingerprint {plan.graph.fingerprint}, "
        f"{len(plan.graph.refined)} block(s) opened, {len(plan.graph.replicated)} replicated",
        f"mesh       {plan.mesh.label} on {plan.mesh.world_size} device(s), costed for {plan.mesh.batch} image(s)"
        + (f"; ranks {plan.mesh.idle_ranks} idle" if plan.mesh.idle_ranks else ""),
        f"stages     imbalance {plan.imbalance:.3f} (slowest / mean compute)",
    ]
    for s in plan.stages:
        shown = ", ".join(s.nodes[:3]) + (f", ... ({len(s.nodes)} nodes)" if len(s.nodes) > 3 else "")
        lines.append(
            f"  stage {s.index} ({plan.mesh.branch_of(s.index)}) on ranks "
            f"{[plan.mesh.rank(d, s.index) for d in range(plan.mesh.dp)]}: {s.cost_s * 1e3:8.3f} ms compute, "
            f"sends {_mb(s.send_bytes)}; {shown}"
        )
    sent = [c for c in plan.cut_tensors if c.constant is None]
    lines.append(f"cut        {len(sent)} tensor(s), {_mb(sum(c.bytes * len(c.consumers) for c in sent))} per window step")
    for c in sent:
        lines.append(f"  {c.node}: stage {c.producer} -> {c.consumers}, {tuple(c.shape)} {c.dtype}, {_mb(c.bytes)}")
    for c in plan.cut_tensors:
        if c.constant is not None:
            lines.append(f"  {c.node}: stage {c.producer} -> {c.consumers}, constant {c.constant} (from the plan)")
    lines += [
        f"schedule   {sch.steps} steps, guidance {sch.guidance_scale}, L={sch.L}, g_slope={sch.g_slope}, "
        f"tau_cap={sch.tau_cap}, k={sch.k}, window guidance {sch.window_guidance}"
        + (f"; strategy {plan.strategy}" if plan.strategy else ""),
        f"estimates  on {est.device}, link {est.link_gbps} Gbit/s: forward {est.forward_s * 1e3:.2f} ms "
        f"(1 row), {est.forward_batch2_s * 1e3:.2f} ms (2 rows), window step {est.window_step_s * 1e3:.2f} ms",
        f"           {_mb(est.window_comm_bytes_per_step)} per window step, {_mb(est.comm_bytes_per_image)} per image, "
        f"batch of {plan.mesh.batch}: {est.latency_s:.3f} s vs {est.serial_latency_s:.3f} s serial, "
        f"speed-up {est.speedup:.2f}x (tau1={est.expected_tau1})",
        "meshes     " + ", ".join(f"{label} {t:.3f} s" for label, t in sorted(est.alternatives.items(), key=lambda x: x[1])),
    ]
    return "\n".join(lines)


def plot(plan: Plan, path: Path) -> None:
    """Draw the partition: stages along the forward, scaled by compute, and their cut links.

    Each stage is a coloured span as wide as its compute; each producer -> consumer link is an
    arc labelled with the bytes it carries per window step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = plt.get_cmap("tab10")
    total = sum(s.cost_s for s in plan.stages)
    starts, x = {}, 0.0
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for s in plan.stages:
        width = s.cost_s / total
        starts[s.index] = (x, width)
        ax.barh(0, width, left=x, height=0.6, color=colours(s.index % 10), edgecolor="white")
        ax.text(x + width / 2, 0, f"stage {s.index}\nposition {s.index} ({plan.mesh.branch_of(s.index)})\n"
                f"{s.cost_s * 1e3:.2f} ms\n{len(s.nodes)} nodes", ha="center", va="center", fontsize=8)
        x += width
    links = {link: sum(c.bytes for c in cuts) for link, cuts in plan.links().items()}
    for (producer, consumer), nbytes in sorted(links.items()):
        a = starts[producer][0] + starts[producer][1] * 0.9
        b = starts[consumer][0] + starts[consumer][1] * 0.1
        rise = 0.25 + 1.2 * abs(b - a)
        t = np.linspace(0.0, 1.0, 50)
        xs, ys = a + (b - a) * t, 0.3 + 4 * rise * t * (1 - t)
        ax.plot(xs[:-1], ys[:-1], color="0.3", lw=1)
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-3], ys[-3]), arrowprops={"arrowstyle": "->", "color": "0.3"})
        ax.text((a + b) / 2, 0.3 + rise, _mb(nbytes), ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.5, 2.0)
    ax.set_yticks([])
    ax.set_xlabel("share of one forward's compute")
    ax.set_title(f"{plan.model.source}: {len(plan.stages)} stages, imbalance {plan.imbalance:.3f}, "
                 f"{_mb(plan.estimates.window_comm_bytes_per_step)} per window step", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    write_atomic(path, tmp.read_bytes())
    tmp.unlink()
