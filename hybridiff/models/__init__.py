"""Where pipelines come from: built-in models by name, or local diffusers folders.

Nothing here touches the network: built-ins are assembled from configs with seeded weights,
and folders load with ``local_files_only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline

from hybridiff.errors import HybridiffError
from hybridiff.models.tiny_sd3 import build_tiny_sd3
from hybridiff.models.tiny_sdxl import build_tiny_sdxl

BUILTINS: dict[str, Callable[[], DiffusionPipeline]] = {"tiny-sdxl": build_tiny_sdxl, "tiny-sd3": build_tiny_sd3}
BUILTIN_PREFIX = "builtin:"


def resolve_source(model: str) -> str:
    """The canonical model reference stored in a plan (absolute path for folders)."""
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise HybridiffError(f"unknown built-in model {model!r}; available: {', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}")
        return model
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise HybridiffError(
            f"model {model!r} is neither a built-in nor a diffusers pipeline folder (no model_index.json); "
            f"use {BUILTIN_PREFIX}tiny-sdxl or a folder written by save_pretrained"
        )
    return str(path.resolve())


def load_pipeline(model: str, dtype: str = "float32", device: str | torch.device = "cpu") -> DiffusionPipeline:
    """Load the pipeline a plan refers to, on ``device`` in ``dtype``."""
    source = resolve_source(model)
    torch_dtype = getattr(torch, dtype)
    if source.startswith(BUILTIN_PREFIX):
        pipe = BUILTINS[source[len(BUILTIN_PREFIX):]]()
        pipe.to(device=device, dtype=None if torch_dtype == torch.float32 else torch_dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, local_files_only=True).to(device)
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise HybridiffError(f"model {model!r} has no unet or transformer denoiser; hybridiff drives denoising pipelines")
    pipe.set_progress_bar_config(disable=True)
    return pipe
