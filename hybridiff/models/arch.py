"""The published denoiser architectures, as facts: real-size models without weights.

Each file in ``configs/`` is the diffusers ``config.json`` of a released denoiser, byte for byte
as published in its Hugging Face model repository (``unet/config.json`` or
``transformer/config.json``). Building one on the meta device gives a module with the real
layer structure, shapes and parameter count but no storage, so plans for full-size models can be
compiled and costed on any machine without downloading a single weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)

from hybridiff.errors import HybridiffError

CONFIG_DIR = Path(__file__).parent / "configs"

ARCHS: dict[str, str] = {
    "sd15": "sd15.json",  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd2": "sd2.json",  # stabilityai/stable-diffusion-2-1 unet/config.json
    "sdxl": "sdxl.json",  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sd3-medium": "sd3-medium.json",  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    "sd35-large": "sd35-large.json",  # stabilityai/stable-diffusion-3.5-large transformer/config.json
}

_CLASSES: dict[str, type[torch.nn.Module]] = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "SD3Transformer2DModel": SD3Transformer2DModel,
    "FluxTransformer2DModel": FluxTransformer2DModel,
    "WanTransformer3DModel": WanTransformer3DModel,
    "QwenImageTransformer2DModel": QwenImageTransformer2DModel,
    "SanaTransformer2DModel": SanaTransformer2DModel,
}


def arch_config(name: str) -> dict[str, Any]:
    """The published diffusers config of architecture ``name`` (a fresh dict on every call)."""
    if name not in ARCHS:
        raise HybridiffError(f"unknown architecture {name!r}; valid names: {', '.join(ARCHS)}")
    return json.loads((CONFIG_DIR / ARCHS[name]).read_text(encoding="utf-8"))


def build_on_device(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Architecture ``name`` in eval mode on ``device``: no weights on the meta device,
    seeded random weights elsewhere (for timing, not for images)."""
    config = arch_config(name)
    model_class = _CLASSES[config["_class_name"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class.from_config(config)
    return model.to(dtype=dtype).eval()


def denoiser_from_config(name: str) -> torch.nn.Module:
    """A built-in model's denoiser from ``configs/<name>.json`` with ``from_config``, with the
    caller's random state (the built-ins seed it so their weights are reproducible)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise HybridiffError(f"no denoiser config {path.name} in {CONFIG_DIR}")
    config = json.loads(path.read_text(encoding="utf-8"))
    return _CLASSES[config["_class_name"]].from_config(config)
