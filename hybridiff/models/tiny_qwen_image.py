"""A tiny, randomly initialised Qwen-Image pipeline built fully offline.

`build_tiny_qwen_image` assembles a stock `diffusers.QwenImagePipeline`: a
`QwenImageTransformer2DModel` (dual-stream blocks over text and image tokens, 3-axis rotary
positions, 2 x 2 packed 16-channel latents), a Qwen2.5-VL language model as the text encoder
(its last hidden state, after the pipeline's chat template, is the context), Qwen-Image's
causal 3-D autoencoder used frame by frame (8x in space) and FlowMatch Euler with dynamic shift.
Guidance is true CFG: two transformer calls per step, conditional then unconditional, with
prompts of their own lengths (the pipeline trims the text to its tokens), so the runtime pads
the shorter branch under its attention mask to pair them.

The tokenizer is the in-memory byte-level BPE of the other built-ins. It spells the chat
template byte by byte, so the pipeline is told how many of its tokens precede the prompt (the
real tokenizer's 34 would leave most of the system text in): the context is then the prompt and
the template's closing tokens, as with the real model. At 256 x 256 pixels the transformer sees
256 image tokens and up to (the card's ``max_sequence_length``) 64 text tokens.
Weights are seeded, so every process builds the same model.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vocabulary


def _text_encoder(vocab_size: int) -> Qwen2_5_VLForConditionalGeneration:
    text = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048, "bos_token_id": None, "eos_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
    }  # fmt: skip
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64, "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(seed: int = 0) -> QwenImagePipeline:
    """Build a tiny random-weight Qwen-Image pipeline (fp32, eval mode, 256 x 256 images)."""
    vocab, merges = build_vocabulary()
    tokenizer = build_tokenizer(vocab, merges, pad_token=EOS_TOKEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(len(tokenizer))
        torch.manual_seed(seed)
        transformer = denoiser_from_config("tiny-qwen-image-transformer")
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    for model in (text_encoder, transformer, vae):
        model.float().eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192,
        base_shift=0.5, max_shift=0.9, time_shift_type="exponential",
    )  # fmt: skip
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.default_sample_size = 32  # latent pixels: 256 x 256 images (the pipeline's default is 128 -> 1024)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    return pipe
