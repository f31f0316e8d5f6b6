"""Every command-line option more than one command takes, declared once.

``compile``, ``run``, ``bench`` and ``simulate`` use these types in their signatures, so an
option has one name, one range, one default rule and one help line wherever it appears."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hybridiff.errors import HybridiffError

#: The most images ``simulate``, ``compile`` and ``bench`` plan for: the simulator's timeline grows with them.
MAX_BATCH = 4096

PlanFile = Annotated[Path, typer.Argument(help="plan.json written by `hybridiff compile`")]
Gpus = Annotated[int, typer.Option(min=1, help="number of devices")]
Batch = Annotated[
    Optional[int], typer.Option(min=1, max=MAX_BATCH, help="images generated together (default: the plan's, or 1)")
]
Steps = Annotated[Optional[int], typer.Option(min=1, help="denoising steps (default: the plan's, or the model's)")]
GuidanceScale = Annotated[
    Optional[float], typer.Option(help="CFG scale; <= 1: no guidance, cfg=1 meshes (default: the plan's, or the model's)")
]
TauCap = Annotated[Optional[int], typer.Option(min=0, help="latest step at which the window starts (default: the model's)")]
WindowLengths = Annotated[
    str, typer.Option("-k", "--k", help="window length in steps, 0: no window; bench: a list, e.g. 5,10,20 (default: the model's)")
]
Warmup = Annotated[
    Optional[int], typer.Option(min=1, help="the pipeline strategy (AsyncDiff): whole steps before its window (default: 9 UNet, 1 SD3)")
]
WindowGuidance = Annotated[
    Optional[str], typer.Option(help="inside the window: 'mixed' (paper) or 'cached' (keeps guidance) (default: the plan's, or mixed)")
]
Threads = Annotated[Optional[int], typer.Option(min=1, help="CPU threads per worker (default: cores / workers)")]
Calibrate = Annotated[
    bool, typer.Option(help="with measured costs: run the model briefly on 2 workers to measure what a step costs besides compute")
]
Prompt = Annotated[Optional[str], typer.Option(help="text prompt (or --prompts FILE)")]
Prompts = Annotated[
    Optional[Path], typer.Option(help="a file of prompts: one per line, or JSON lines with prompt, negative_prompt, seed")
]
ImagesPerPrompt = Annotated[Optional[int], typer.Option(min=1, max=10_000, help="images per prompt (seeds seed, seed+1, ...) (default: 1)")]
Repeats = Annotated[int, typer.Option(min=1, max=1000, help="generate every image this many times; latency is the median")]
ExecutionMode = Annotated[
    Optional[str],
    typer.Option(help="'eager' or 'compiled': every program through torch.compile, CUDA graphs on CUDA (default: the plan's, or eager)"),
]
BenchExecution = Annotated[
    Optional[str],
    typer.Option(help="'eager', 'compiled' or 'both' (every entry, serial too, run both ways) (default: the plan's, or eager)"),
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def execution_mode(text: str | None) -> str | None:
    """``--execution`` checked: eager, compiled or not given."""
    if text not in (None, "eager", "compiled"):
        raise HybridiffError(f"--execution {text!r}: use 'eager' or 'compiled'")
    return text


def window_lengths(text: str, one: bool = False) -> list[int]:
    """``--k 5,10,20`` as integers >= 0 (empty: the model's own k); ``one``: a single length."""
    try:
        ks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HybridiffError(f"--k {text!r}: give window lengths as integers, e.g. 5,10,20,30") from None
    if any(v < 0 for v in ks):
        raise HybridiffError(f"--k {text!r}: window lengths are >= 0")
    if one and len(ks) > 1:
        raise HybridiffError(f"--k {text!r}: a plan has one window length; compare several with `hybridiff bench MODEL --k`")
    return ks
