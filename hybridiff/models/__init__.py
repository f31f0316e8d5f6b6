"""Where pipelines come from: built-in models by name, or local diffusers folders.

Nothing here touches the network: the tiny built-ins are assembled from configs with seeded
weights, the trained ones (``digits-sdxl``, ``digits-sd3``) are diffusers folders shipped in
the package, and every folder loads with ``local_files_only``. A folder may carry a
``hybridiff.json`` card: schedule defaults for ``hybridiff compile`` and keyword arguments
every pipeline call needs (``model_card``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from hybridiff.errors import HybridiffError
from hybridiff.models.tiny_flux import build_tiny_flux
from hybridiff.models.tiny_qwen_image import build_tiny_qwen_image
from hybridiff.models.tiny_sana import build_tiny_sana
from hybridiff.models.tiny_sd3 import build_tiny_sd3
from hybridiff.models.tiny_sdxl import build_tiny_sdxl
from hybridiff.models.tiny_wan import build_tiny_wan

BUILTINS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sdxl": build_tiny_sdxl, "tiny-sd3": build_tiny_sd3, "tiny-flux": build_tiny_flux,
    "tiny-qwen-image": build_tiny_qwen_image, "tiny-sana": build_tiny_sana, "tiny-wan": build_tiny_wan,
}  # fmt: skip
#: Cards of the built-ins assembled in code (the trained ones keep theirs in their folder).
BUILTIN_CARDS: dict[str, dict[str, Any]] = {
    # Flux guides with true CFG only when a negative prompt is given: "" unless a call says otherwise
    "tiny-flux": {"pipeline_kwargs": {"max_sequence_length": 32, "negative_prompt": ""}},
    # Qwen-Image likewise (" " as its own examples give); plans pad its text to 64 tokens
    "tiny-qwen-image": {"pipeline_kwargs": {"max_sequence_length": 64, "negative_prompt": " "}},
    # Sana at its own size (no binning to 512 x 512), without the long instruction before each prompt
    "tiny-sana": {"pipeline_kwargs": {"max_sequence_length": 32, "use_resolution_binning": False, "complex_human_instruction": ""}},
    "tiny-wan": {"pipeline_kwargs": {"max_sequence_length": 32, "num_frames": 5}},
}
#: Trained built-ins: name -> the package folder holding their weights.
TRAINED = {name: Path(__file__).parent / "weights" / name for name in ("digits-sdxl", "digits-sd3")}
BUILTIN_PREFIX = "builtin:"
CARD = "hybridiff.json"


def resolve_source(model: str) -> str:
    """The canonical model reference stored in a plan (absolute path for folders)."""
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX):]
        if name not in BUILTINS and name not in TRAINED:
            known = ", ".join(BUILTIN_PREFIX + n for n in [*BUILTINS, *TRAINED])
            raise HybridiffError(f"unknown built-in model {model!r}; available: {known}")
        if name in TRAINED and not (TRAINED[name] / "model_index.json").is_file():
            raise HybridiffError(f"{model} has no weights in this install; train them: python -m hybridiff.zoo.train {name}")
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
    name = source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else None
    if name in BUILTINS:
        pipe = BUILTINS[name]()
        pipe.to(device=device, dtype=None if torch_dtype == torch.float32 else torch_dtype)
    else:
        folder = Path(TRAINED[name] if name else source)
        # components saved as [null, null] (SD3 without its T5 encoder) must be passed as None
        index = json.loads((folder / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}
        diffusers_logging.disable_progress_bar()  # per-component loading bars, from every worker
        transformers_logging.disable_progress_bar()
        pipe = _from_folder(folder, torch_dtype, absent).to(device)
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise HybridiffError(f"model {model!r} has no unet or transformer denoiser; hybridiff drives denoising pipelines")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_folder(folder: Path, dtype: torch.dtype, absent: dict[str, None]) -> DiffusionPipeline:
    """A stock diffusers pipeline from ``folder``: safetensors weights only (nothing is
    unpickled) and no custom code; whatever diffusers refuses becomes one line."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # it logs what it then raises
    try:
        return DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True, **absent)
    except (AttributeError, ImportError, OSError, ValueError, TypeError, KeyError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise HybridiffError(
            f"cannot load the pipeline in {folder} ({type(e).__name__}: {first}); hybridiff loads diffusers "
            "pipelines of stock classes with safetensors weights, never custom code or pickled weights"
        ) from None
    finally:
        diffusers_logging.set_verbosity(level)


def model_card(model: str) -> dict[str, Any]:
    """The model's ``hybridiff.json`` (schedule defaults, pipeline call arguments), or {}."""
    source = resolve_source(model)
    name = source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else None
    if name in BUILTIN_CARDS:
        return json.loads(json.dumps(BUILTIN_CARDS[name]))  # a fresh copy
    folder = TRAINED.get(name) if name else Path(source)
    card = folder / CARD if folder else None
    return json.loads(card.read_text()) if card and card.is_file() else {}
