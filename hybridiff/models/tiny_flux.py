"""A tiny, randomly initialised Flux.1 pipeline built fully offline.

`build_tiny_flux` assembles a stock `diffusers.FluxPipeline` with Flux's architecture in
miniature: a `FluxTransformer2DModel` (double-stream blocks, then single-stream blocks, rotary
positions over text and image tokens, 2 x 2 packed 16-channel latents), a CLIP text encoder
whose pooled output conditions the timestep embedding, a T5 encoder for the token context, a
16-channel KL autoencoder and Flux's FlowMatch Euler scheduler with resolution-dependent shift.
It is not guidance-distilled (``guidance_embeds=False``), so classifier-free guidance is the
pipeline's true CFG (``true_cfg_scale`` with a negative prompt): two transformer calls per step,
conditional then unconditional, the call pattern of Flux, Qwen-Image and Wan.

The T5 slot gets the same in-memory byte-level BPE tokenizer as the CLIP slot (the pipeline only
needs ids padded to ``max_sequence_length``). At 128 x 128 pixels the transformer sees 256
image tokens and 32 text tokens. Weights are seeded, so every process builds the same model.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vae, build_vocabulary, text_config

LATENT_CHANNELS = 16


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    """Build a tiny random-weight Flux pipeline (fp32, eval mode, 128 x 128 images)."""
    vocab, merges = build_vocabulary()
    tokenizer = build_tokenizer(vocab, merges, pad_token=EOS_TOKEN)
    tokenizer_2 = build_tokenizer(vocab, merges, pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(text_config(tokenizer, 32, num_heads=2, hidden_act="gelu"))
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_2), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, pad_token_id=0)
        )
        torch.manual_seed(seed)
        transformer = denoiser_from_config("tiny-flux-transformer")
        torch.manual_seed(seed)
        vae = build_vae(LATENT_CHANNELS, 0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    for model in (clip, t5, transformer, vae):
        model.float().eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
        transformer=transformer,
    )  # fmt: skip
    pipe.default_sample_size = 32  # latent pixels: 128 x 128 images (the pipeline's default is 128 -> 512)
    return pipe
