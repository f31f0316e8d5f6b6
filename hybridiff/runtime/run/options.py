"""What one ``run`` asks for. Standard library only: the launcher hands it to every worker,
and a worker unpickles it before it has imported torch or diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hybridiff.runtime.api import Mode
from hybridiff.runtime.run.requests import ImageRequest


@dataclass(frozen=True)
class RunOptions:
    plan: Path
    requests: tuple[ImageRequest, ...]
    out: Path
    mode: Mode = "hybrid"
    steps: int | None = None
    guidance_scale: float | None = None
    threads: int | None = None
    repeats: int = 1
    window_guidance: Literal["mixed", "cached"] | None = None
    scheduler: str | None = None
    #: Folder for per-rank step traces (``rank-<r>.json``) and the report's ``profile_ms``.
    trace: Path | None = None
    #: "eager" or "compiled" programs; None: the plan's.
    execution: Literal["eager", "compiled"] | None = None

