"""Train the built-in digit models: ``python -m hybridiff.zoo.train TARGET [--steps N]``.

Targets, in the order they depend on each other:

- ``classifier``: the CNN judge (``classifier.py``), on the training split; reports held-out
  accuracy.
- ``vae``: a 3-block ``AutoencoderKL`` (32 x 32 x 3 pixels -> 8 x 8 x 4 latents) shared by
  both pipelines; its scaling factor makes the latents unit-variance, as in Stable Diffusion.
- ``digits-sdxl``: a ``UNet2DConditionModel`` with SDXL's text_time conditioning, epsilon
  prediction on SDXL's noise schedule, inside a ``StableDiffusionXLPipeline``.
- ``digits-sd3``: an ``SD3Transformer2DModel`` trained with flow matching (logit-normal
  sigmas, velocity ``noise - x0``), inside a ``StableDiffusion3Pipeline``.

Text encoders are CLIP models with seeded random weights, kept frozen: what matters is that the
ten prompts map to ten distinct embeddings the denoiser learns to follow. One sample in ten is
trained on the pipeline's unconditional embedding, so classifier-free guidance is meaningful.
Everything is seeded and runs on one CPU thread by default, so a target gives the same weights
each time it runs on the same software. Weights are saved in float16 (they load as float32).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from hybridiff import quiet_libraries
from hybridiff.models import TRAINED
from hybridiff.models.arch import denoiser_from_config
from hybridiff.models.components import EOS_TOKEN, build_tokenizer, build_vocabulary, sdxl_scheduler, text_config
from hybridiff.zoo import digits
from hybridiff.zoo.classifier import WEIGHTS as CLASSIFIER_WEIGHTS
from hybridiff.zoo.classifier import DigitClassifier

WEIGHTS = Path(__file__).parent / "weights"
LATENT_CHANNELS = 4
LATENT_SIZE = digits.IMAGE_SIZE // 4
#: Steps each target trains for by default (at most about 30 minutes each on one CPU thread here).
DEFAULT_STEPS = {"classifier": 1500, "vae": 1000, "digits-sdxl": 2000, "digits-sd3": 2400}
#: SD3 without its T5 encoder pads the context with zeros; 8 positions keep the context short.
SD3_MAX_SEQUENCE_LENGTH = 8
#: What the runtime needs to know about each trained model besides its diffusers folder.
CARD_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits-sdxl": {"pipeline_kwargs": {}, "schedule": {"steps": 50, "guidance_scale": 5.0}},
    "digits-sd3": {
        "pipeline_kwargs": {"max_sequence_length": SD3_MAX_SEQUENCE_LENGTH},
        "schedule": {"steps": 50, "guidance_scale": 5.0},
    },
}


def _log(message: str) -> None:
    print(message, flush=True)


def _batches(steps: int, batch: int, count: int, seed: int) -> Callable[[], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(count, (batch,), generator=generator)


def train_classifier(steps: int) -> dict[str, Any]:
    images, labels = digits.load("train")
    test_images, test_labels = digits.load("test")
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    pick, generator = _batches(steps, 128, len(labels), 0), torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        idx = pick()
        loss = F.cross_entropy(model(digits.augment(images[idx], generator)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            _log(f"classifier step {step}: loss {loss.item():.4f}")
    model.eval()
    with torch.inference_mode():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    CLASSIFIER_WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, CLASSIFIER_WEIGHTS / "model.safetensors")
    card = {"held_out_accuracy": accuracy, "held_out_images": len(test_labels), "train_steps": steps}
    (CLASSIFIER_WEIGHTS / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=digits.IMAGE_SIZE,
        shift_factor=0.0,  # SD3's pipeline reads it; SDXL's ignores it
    )


def train_vae(steps: int) -> dict[str, Any]:
    images, _ = digits.load("train")
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    pick, generator = _batches(steps, 32, len(images), 2), torch.Generator().manual_seed(3)
    vae.train()
    for step in range(steps):
        x = digits.to_rgb(digits.augment(images[pick()], generator))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean() / (LATENT_CHANNELS * LATENT_SIZE**2)
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            _log(f"vae step {step}: loss {loss.item():.4f} (kl {kl.item():.3f})")
    vae.eval()
    all_images, _ = digits.load("train")
    with torch.inference_mode():
        latents = vae.encode(digits.to_rgb(all_images)).latent_dist.mean
        test, _ = digits.load("test")
        recon = vae.decode(vae.encode(digits.to_rgb(test)).latent_dist.mean).sample
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(WEIGHTS / "vae")
    return {"held_out_mse": F.mse_loss(recon, digits.to_rgb(test)).item(), "scaling_factor": vae.config.scaling_factor}


def _text_encoders(projected_first: bool) -> tuple[Any, Any, Any, Any]:
    """Two seeded CLIP encoders and their tokenizers (SDXL's first encoder has no projection)."""
    vocab, merges = build_vocabulary()
    tokenizer, tokenizer_2 = build_tokenizer(vocab, merges, EOS_TOKEN), build_tokenizer(vocab, merges, "!")
    torch.manual_seed(10)
    first_cls = CLIPTextModelWithProjection if projected_first else CLIPTextModel
    first = first_cls(text_config(tokenizer, 32, num_heads=2, hidden_act="quick_gelu", projection_dim=32))
    second = CLIPTextModelWithProjection(text_config(tokenizer_2, 64, num_heads=4, hidden_act="gelu", projection_dim=32))
    return first.eval(), tokenizer, second.eval(), tokenizer_2


def _training_latents(vae: AutoencoderKL, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit (both splits) ``copies`` times, augmented, encoded and scaled."""
    train_images, train_labels = digits.load("train")
    test_images, test_labels = digits.load("test")
    images, labels = torch.cat([train_images, test_images]), torch.cat([train_labels, test_labels])
    generator, out = torch.Generator().manual_seed(4), []
    with torch.inference_mode():
        for copy in range(copies):
            x = images if copy == 0 else digits.augment(images, generator)
            out.append(vae.encode(digits.to_rgb(x)).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out), labels.repeat(copies)


class _EMA:
    def __init__(self, model: torch.nn.Module) -> None:
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(0.998, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else self.shadow[k].copy_(v)


def _fit(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
    latents: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch: int = 128,
) -> None:
    """Train ``model`` with AdamW, warm-up and cosine decay; leaves the EMA weights in it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item())
    )
    pick, generator = _batches(steps, batch, len(labels), 5), torch.Generator().manual_seed(6)
    ema, start = _EMA(model), time.perf_counter()
    model.train()
    for step in range(steps):
        idx = pick()
        dropped = torch.rand(batch, generator=generator) < 0.1  # unconditional samples for CFG
        loss = loss_fn(latents[idx], labels[idx], dropped, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(model, step)
        if step % 200 == 0 or step == steps - 1:
            _log(f"{name} step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    model.load_state_dict(ema.shadow)
    model.eval()


def _save(pipe: Any, name: str, card: dict[str, Any]) -> None:
    folder = TRAINED[name]  # the models package owns the pipelines it loads; zoo writes them there
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    (folder / "hybridiff.json").write_text(json.dumps(card, indent=2) + "\n")


def _load_vae() -> AutoencoderKL:
    if not (WEIGHTS / "vae").is_dir():
        raise SystemExit("train the shared autoencoder first: python -m hybridiff.zoo.train vae")
    return AutoencoderKL.from_pretrained(WEIGHTS / "vae").eval()


def train_digits_sdxl(steps: int) -> dict[str, Any]:
    vae = _load_vae()
    text_encoder, tokenizer, text_encoder_2, tokenizer_2 = _text_encoders(projected_first=False)
    torch.manual_seed(20)
    unet = denoiser_from_config("digits-sdxl-unet")
    scheduler = sdxl_scheduler()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(list(digits.PROMPTS), device="cpu", do_classifier_free_guidance=False)
    embeds, pooled = embeds.clone(), pooled.clone()
    size = digits.IMAGE_SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    noise_schedule = DDPMScheduler.from_config(scheduler.config)
    latents, labels = _training_latents(vae, copies=8)

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, dropped: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keep = (~dropped).float()
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(y),), generator=gen)
        noisy = noise_schedule.add_noise(x0, noise, t)
        # the pipeline's unconditional branch: zero embeddings (force_zeros_for_empty_prompt)
        cond = {"text_embeds": pooled[y] * keep[:, None], "time_ids": time_ids.expand(len(y), -1)}
        pred = unet(noisy, t, embeds[y] * keep[:, None, None], added_cond_kwargs=cond).sample
        return F.mse_loss(pred, noise)

    _fit("digits-sdxl", unet, loss_fn, latents, labels, steps)
    _save(pipe, "digits-sdxl", CARD_DEFAULTS["digits-sdxl"])
    return {"params": sum(p.numel() for p in unet.parameters())}


def train_digits_sd3(steps: int) -> dict[str, Any]:
    vae = _load_vae()
    text_encoder, tokenizer, text_encoder_2, tokenizer_2 = _text_encoders(projected_first=True)
    torch.manual_seed(30)
    transformer = denoiser_from_config("digits-sd3-transformer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )
    with torch.inference_mode():
        embeds, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            list(digits.PROMPTS), None, None, device="cpu", do_classifier_free_guidance=True,
            max_sequence_length=SD3_MAX_SEQUENCE_LENGTH,
        )
    embeds, pooled, uncond, uncond_pooled = embeds.clone(), pooled.clone(), uncond[:1].clone(), uncond_pooled[:1].clone()
    latents, labels = _training_latents(vae, copies=8)

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, dropped: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(y), generator=gen))  # logit-normal, as SD3
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        context = torch.where(dropped[:, None, None], uncond, embeds[y])
        pooled_y = torch.where(dropped[:, None], uncond_pooled, pooled[y])
        pred = transformer(noisy, context, pooled_y, sigma * 1000).sample
        return F.mse_loss(pred, noise - x0)

    _fit("digits-sd3", transformer, loss_fn, latents, labels, steps)
    _save(pipe, "digits-sd3", CARD_DEFAULTS["digits-sd3"])
    return {"params": sum(p.numel() for p in transformer.parameters())}


TARGETS = {"classifier": train_classifier, "vae": train_vae, "digits-sdxl": train_digits_sdxl, "digits-sd3": train_digits_sd3}


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=list(TARGETS))
    parser.add_argument("--steps", type=int, help="optimizer steps [default: per target]")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (results depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = TARGETS[args.target](args.steps or DEFAULT_STEPS[args.target])
    _log(json.dumps({"target": args.target, "seconds": round(time.perf_counter() - start, 1), **result}))


if __name__ == "__main__":
    main()
