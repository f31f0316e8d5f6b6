"""A tiny, randomly initialised Sana pipeline built fully offline.

`build_tiny_sana` assembles a stock `diffusers.SanaPipeline`: a `SanaTransformer2DModel`
(linear self-attention and Mix-FFN over the latent's tokens, cross-attention to the text), a
Gemma 2 text encoder built from a config, a deep-compression autoencoder (`AutoencoderDC`, 8x
here) and FlowMatch Euler. Guidance is batched like SD3's: one transformer call per step with
``[uncond; cond]`` rows, the text padded to ``max_sequence_length`` under its attention mask.

The card turns off what would make a tiny run large or slow: resolution binning (it would
generate at 512 x 512 and resize) and the long "complex human instruction" prepended to every
prompt. At 128 x 128 pixels the transformer sees 256 image tokens and 32 text tokens. Weights
are seeded, so every process builds the same model.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
from transformers import Gemma2Config, Gemma2Model

from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vocabulary

LATENT_CHANNELS = 8


def _vae() -> AutoencoderDC:
    levels = (16, 32, 32, 32)  # three 2x steps: 8x
    return AutoencoderDC(
        latent_channels=LATENT_CHANNELS, encoder_block_out_channels=levels, decoder_block_out_channels=levels,
        encoder_layers_per_block=(1,) * 4, decoder_layers_per_block=(1,) * 4, encoder_qkv_multiscales=((),) * 4,
        decoder_qkv_multiscales=((),) * 4, scaling_factor=0.41,
    )  # fmt: skip


def build_tiny_sana(seed: int = 0) -> SanaPipeline:
    """Build a tiny random-weight Sana pipeline (fp32, eval mode, 128 x 128 images)."""
    vocab, merges = build_vocabulary()
    tokenizer = build_tokenizer(vocab, merges, pad_token=EOS_TOKEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0,
        )  # fmt: skip
        text_encoder = Gemma2Model(text)
        torch.manual_seed(seed)
        transformer = denoiser_from_config("tiny-sana-transformer")
        torch.manual_seed(seed)
        vae = _vae()
    for model in (text_encoder, transformer, vae):
        model.float().eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
