"""A tiny, randomly initialised Wan 2.1 text-to-video pipeline built fully offline.

`build_tiny_wan` assembles a stock `diffusers.WanPipeline`: a `WanTransformer3DModel` (3-D
rotary positions over frames and patches, cross-attention to the text, 5-D latents
``[rows, 16, frames, height, width]``), a UMT5 text encoder, Wan's causal 3-D autoencoder
(4x in time, 8x in space) and a FlowMatch Euler scheduler. Guidance is two transformer calls
per step (conditional, then unconditional), as for Flux. There is one expert: Wan 2.2's second
(``transformer_2`` after ``boundary_ratio``) is not built here.

The tokenizer is the in-memory byte-level BPE of the other built-ins (the pipeline only needs
ids padded to ``max_sequence_length``). Five 64 x 64 frames give 2 latent frames of 8 x 8, 32
tokens after 2 x 2 patches. Weights are seeded, so every process builds the same model.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from transformers import UMT5Config, UMT5EncoderModel

from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vocabulary


def build_tiny_wan(seed: int = 0) -> WanPipeline:
    """Build a tiny random-weight Wan pipeline (fp32, eval mode)."""
    vocab, merges = build_vocabulary()
    tokenizer = build_tokenizer(vocab, merges, pad_token=EOS_TOKEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, pad_token_id=0)
        )
        torch.manual_seed(seed)
        transformer = denoiser_from_config("tiny-wan-transformer")
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    for model in (text_encoder, transformer, vae):
        model.float().eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.default_sample_size = 8  # latent pixels: 64 x 64 frames, what hybridiff compiles for unless told
    return pipe
