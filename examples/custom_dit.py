"""A denoiser written from scratch, sampled by a hand-written loop, run by hybridiff.

A small diffusion transformer (patch embedding, adaLN-modulated attention blocks conditioned
on a timestep and a condition vector, unpatchify) and a flow-matching Euler loop with
classifier-free guidance. Nothing here comes from diffusers.

    python examples/custom_dit.py compile plan.json            # trace, cost and cut it for 2 devices
    python examples/custom_dit.py sample plan.json out.pt      # the plan emulated in one process
    torchrun --nproc-per-node 2 examples/custom_dit.py sample plan.json out.pt   # on 2 workers
    torchrun --nproc-per-node 2 examples/custom_dit.py bench plan.json   # plain loop vs 2 workers, side by side
    python examples/custom_dit.py plain plan.json out.pt       # the plain loop (as many steps), for comparison

``--two-calls`` guides with one call per branch (conditional first) instead of one call on
``[uncond; cond]`` rows; give it to ``compile`` too (the plan records how the loop guides).
``--compiled`` runs every program through ``torch.compile`` (``sample``, ``bench``: the plain
loop's model too; a first, untimed loop compiles).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import hybridiff

CHANNELS, SIZE, PATCH, DIM, HEADS, DEPTH, COND = 4, 32, 2, 96, 4, 6, 32


class Block(nn.Module):
    """Self-attention and an MLP, each scaled and shifted by the conditioning (adaLN)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False), nn.LayerNorm(DIM, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        self.modulation = nn.Linear(DIM, 6 * DIM)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).unflatten(-1, (3, HEADS, DIM // HEADS)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + gate1 * self.proj(attended)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    """Predicts the flow-matching velocity of a ``CHANNELS x SIZE x SIZE`` latent."""

    def __init__(self) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(CHANNELS, DIM, PATCH, stride=PATCH)
        self.position = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2, DIM) * 0.02)
        self.time = nn.Sequential(nn.Linear(64, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.condition = nn.Linear(COND, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.out = nn.Linear(DIM, PATCH * PATCH * CHANNELS)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(32, device=x.device) / 32)
        angles = t[:, None] * 1000 * frequencies[None]
        c = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1)) + self.condition(cond)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            h = block(h, c)
        side = SIZE // PATCH
        h = self.out(h).reshape(-1, side, side, PATCH, PATCH, CHANNELS)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, CHANNELS, SIZE, SIZE)


def build(seed: int = 0) -> TinyDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyDiT().eval()


def example_inputs(rows: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One branch's call: what ``hybridiff.compile`` traces and costs."""
    return torch.randn(rows, CHANNELS, SIZE, SIZE), torch.full((rows,), 0.5), torch.randn(rows, COND)


def sample(
    denoiser, steps: int = 20, scale: float = 4.0, seed: int = 0, two_calls: bool = False, images: int = 1
) -> torch.Tensor:
    """Flow-matching Euler from noise (t = 1) to data (t = 0) with classifier-free guidance;
    ``denoiser`` is the model itself or ``hybridiff.parallelize(model, plan)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, CHANNELS, SIZE, SIZE, generator=gen)
    cond, uncond = torch.randn(images, COND, generator=gen), torch.zeros(images, COND)
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        t_rows = t.expand(images)
        if two_calls:
            v_cond = denoiser(x, t_rows, cond)
            v_uncond = denoiser(x, t_rows, uncond)
        else:
            v_uncond, v_cond = denoiser(torch.cat([x, x]), t_rows.repeat(2), torch.cat([uncond, cond])).chunk(2)
        x = x + (t_next - t) * (v_uncond + scale * (v_cond - v_uncond))
    return x


def main(argv: list[str]) -> None:
    two_calls, compiled = "--two-calls" in argv, "--compiled" in argv
    command, *paths = [a for a in argv if not a.startswith("--")]
    model = build()
    torch.set_num_threads(1)
    if command == "compile":
        plan = hybridiff.compile(model, example_inputs(), gpus=2, latent="x", guidance="two-calls" if two_calls else "batched")
        plan.save(paths[0])
        print(f"wrote {paths[0]}: mesh {plan.mesh.label}")
    elif command == "plain":
        steps = hybridiff.load_plan(paths[0]).schedule.steps
        with torch.inference_mode():
            torch.save(sample(model, steps=steps, two_calls=two_calls), paths[1])
    elif command == "bench":
        bench(model, paths[0], two_calls, compiled)
    else:
        with parallel(model, paths[0], two_calls, compiled) as denoiser:
            steps = denoiser.plan.schedule.steps  # the loop's length is the user's; here the plan's
            with denoiser.loop(steps=steps):
                x = sample(denoiser, steps=steps, two_calls=two_calls)
            report = denoiser.last_report
            if denoiser.rank == 0:
                torch.save(x, paths[1])
                print(f"tau1={report.tau1} tau2={report.tau2} {report.latency_s:.3f} s, {report.comm_bytes} bytes sent")


def parallel(model: TinyDiT, plan: str, two_calls: bool, compiled: bool = False):
    """The model run by ``plan``: on the workers under torchrun, else emulated here."""
    guidance = "two-calls" if two_calls else "batched"
    execution = "compiled" if compiled else None
    return hybridiff.parallelize(model, plan, guidance=guidance, emulate="RANK" not in os.environ, execution=execution)


def bench(model: TinyDiT, plan: str, two_calls: bool, compiled: bool = False, rounds: int = 5) -> None:
    """The plain loop on one worker against the plan's loop on all, in alternating rounds
    (compiled: both under torch.compile, after a first round that compiles and is not counted)."""
    plain_model = torch.compile(model, dynamic=False) if compiled else model
    with parallel(model, plan, two_calls, compiled) as denoiser:
        steps = denoiser.plan.schedule.steps
        plain, hybrid = [], []
        for _ in range(rounds + compiled):
            if denoiser.rank == 0:
                start = time.perf_counter()
                with torch.inference_mode():
                    sample(plain_model, steps=steps, two_calls=two_calls)
                plain.append(time.perf_counter() - start)
            if dist.is_initialized():
                dist.barrier()  # the other workers wait while rank 0 runs the plain loop alone
            start = time.perf_counter()
            with denoiser.loop(steps=steps):
                sample(denoiser, steps=steps, two_calls=two_calls)
            hybrid.append(time.perf_counter() - start)
        plain, hybrid = plain[compiled:], hybrid[compiled:]
        if denoiser.rank == 0:
            measured, predicted = statistics.median(plain) / statistics.median(hybrid), denoiser.plan.estimates.speedup
            print(
                f"plain {statistics.median(plain):.3f} s | hybrid {statistics.median(hybrid):.3f} s on "
                f"{denoiser.plan.mesh.world_size} workers | speed-up {measured:.2f}x (the plan predicted {predicted:.2f}x, "
                f"error {100 * (predicted / measured - 1):+.1f}%)"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
