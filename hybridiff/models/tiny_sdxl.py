"""A tiny, randomly initialised Stable Diffusion XL pipeline built fully offline.

`build_tiny_sdxl` assembles a real `diffusers.StableDiffusionXLPipeline` whose components have
the same *architecture* as SDXL (two CLIP text encoders whose penultimate hidden states are
concatenated, a "text_time" conditioned UNet with the SDXL block layout, a KL autoencoder and an
Euler scheduler with SDXL's schedule) but are tiny, so no weights are ever downloaded.

Sizing rationale:

* Latents are 4 x 32 x 32 and the VAE has 3 blocks (downsampling factor 4), so the pipeline's
  default resolution (``unet.config.sample_size * vae_scale_factor``) is a 128 x 128 image.
* The UNet (block channels 32/64/128, two layers per block, one transformer layer per attention
  block, 32-dim attention heads, ~6M parameters) is the only component whose cost matters while
  denoising. It is sized so that one batch-1 forward at the native latent size takes roughly
  30-40 ms in fp32 on a single CPU thread: long enough that per-step UNet work dominates any
  per-call scheduling/launch overhead in measurements, yet short enough that a multi-step
  generation (with classifier-free guidance, i.e. batch 2 per step) finishes in well under a
  second.
* Text encoders, tokenizers and VAE are only as large as needed to exercise the real code paths;
  their cost is negligible next to the UNet. The tokenizers share an in-memory byte-level BPE
  vocabulary covering every byte (so any prompt tokenizes without unknown tokens) plus a few
  hundred common English words learned with a small deterministic BPE trainer.

Every model is initialised from ``torch.manual_seed(seed)`` in a fixed order, so a given seed yields
bit-identical weights across calls and processes; the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vae, build_vocabulary, sdxl_scheduler, text_config

TEXT_ENCODER_1_HIDDEN = 32
TEXT_ENCODER_2_HIDDEN = 64


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build a tiny random-weight SDXL pipeline (fp32, eval mode, 128 x 128 default images)."""
    vocab, merges = build_vocabulary()
    tokenizer = build_tokenizer(vocab, merges, pad_token=EOS_TOKEN)
    tokenizer_2 = build_tokenizer(vocab, merges, pad_token="!")  # as in SDXL's tokenizer_2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            text_config(tokenizer, TEXT_ENCODER_1_HIDDEN, num_heads=2, hidden_act="quick_gelu")
        )
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(tokenizer_2, TEXT_ENCODER_2_HIDDEN, num_heads=4, hidden_act="gelu")
        )
        torch.manual_seed(seed)
        unet = denoiser_from_config("tiny-sdxl-unet")
        torch.manual_seed(seed)
        vae = build_vae()

    for model in (text_encoder, text_encoder_2, unet, vae):
        model.float().eval()  # diffusers' `.to(dtype)` logs a keep-in-fp32 warning; `.float()` does not

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
        add_watermarker=False,
    )
