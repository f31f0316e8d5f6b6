"""A tiny, randomly initialised Stable Diffusion 3 pipeline built fully offline.

`build_tiny_sd3` assembles a real `diffusers.StableDiffusion3Pipeline` with SD3's architecture
in miniature: an MMDiT (`SD3Transformer2DModel`, joint attention over image and text tokens,
flow matching), two CLIP text encoders with projections whose pooled outputs condition the
timestep embedding, a 16-channel KL autoencoder and SD3's shifted FlowMatch Euler scheduler.
The third (T5) encoder is left out, as SD3 allows: the pipeline then pads the text context with
zeros, so the denoiser sees SD3's context length (CLIP tokens plus 256 T5 positions).

It exists to exercise the runtime on a flow-matching transformer: one forward of a row at the
native 32 x 32 latent (128 x 128 pixels) takes tens of milliseconds on one CPU thread.
Weights are seeded, so every process builds the same model.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vae, build_vocabulary, text_config

LATENT_CHANNELS = 16
TEXT_HIDDEN = (32, 64)
PROJECTION_DIM = 32


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build a tiny random-weight SD3 pipeline (fp32, eval mode, 128 x 128 default images)."""
    vocab, merges = build_vocabulary()
    tokenizer = build_tokenizer(vocab, merges, pad_token=EOS_TOKEN)
    tokenizer_2 = build_tokenizer(vocab, merges, pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoders = [
            CLIPTextModelWithProjection(text_config(tok, hidden, num_heads=2, hidden_act="gelu", projection_dim=PROJECTION_DIM))
            for tok, hidden in zip((tokenizer, tokenizer_2), TEXT_HIDDEN)
        ]
        torch.manual_seed(seed)
        transformer = denoiser_from_config("tiny-sd3-transformer")
        torch.manual_seed(seed)
        vae = build_vae(LATENT_CHANNELS, 1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    for model in (*encoders, transformer, vae):
        model.float().eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
