"""Tracing adapters for the diffusers denoisers hybridiff knows by class.

``torch.fx.symbolic_trace`` cannot trace ``UNet2DConditionModel.forward`` or
``SD3Transformer2DModel.forward`` as written: they iterate ``sample.shape``, branch on optional
arguments and wrap outputs in dataclasses. Each adapter restates its model's forward for the
one configuration at hand (a plain Python function of the config, so every branch is settled
while tracing) and traces it with the model's blocks as opaque leaves. The graphs compute
exactly what the models compute (tests check bit equality).

The graphs take the denoiser's inputs as flat named tensors (``input_names``);
``inputs_from_call`` turns a diffusers pipeline's denoiser call into that form and
``wrap_output`` returns the prediction as the model would, so the runtime can stand in for the
denoiser inside a stock pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import fx, nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.tokens import TokenLayout, declare_tokens
from hybridiff.graph.trace import LATENT_INPUT, BlockTracer, default_leaves, drop_concrete_inputs, register_adapter


class _UNetForward(nn.Module):
    """``UNet2DConditionModel.forward`` restated for one config, traceable by torch.fx."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.has_text_time = unet.config.addition_embed_type == "text_time"

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        unet = self.unet
        # time_proj returns float32; cast to the embedding's parameter dtype (a graph constant
        # would bake the dtype into the fingerprint and make fp16 and fp32 plans differ).
        emb_weight = unet.time_embedding.linear_1.weight
        emb = unet.time_embedding(unet.time_proj(timestep).to(emb_weight.dtype))
        if self.has_text_time:
            time_embeds = unet.add_time_proj(time_ids.flatten())
            time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
            add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb_weight.dtype)
            emb = emb + unet.add_embedding(add_embeds)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)

        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        sample = unet.conv_in(sample)

        skips = [sample]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                out = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                out = block(hidden_states=sample, temb=emb)
            sample = out[0]
            n_res = len(block.resnets) + (0 if block.downsamplers is None else 1)
            skips.extend(out[1][j] for j in range(n_res))

        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample = unet.mid_block(sample, emb)

        for block in unet.up_blocks:
            n = len(block.resnets)
            res, skips = tuple(skips[-n:]), skips[:-n]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=encoder_hidden_states,
                )
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)

        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)



def _unsupported(field: str, value: Any) -> HybridiffError:
    return HybridiffError(
        f"unsupported UNet config: {field}={value!r}; hybridiff traces UNet2DConditionModel "
        "without class/image/hint conditioning (SD1.x, SD2.x, SDXL text_time)"
    )


def _tensor_maker(model: nn.Module, batch: int) -> Any:
    """Tensors of ``batch`` rows for an example call: empty on the meta device (no memory),
    seeded random elsewhere."""
    device, gen = model.device, torch.Generator().manual_seed(batch)

    def make(*shape: int, dt: torch.dtype = model.dtype) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(batch, *shape, device=device, dtype=dt)
        return torch.randn(batch, *shape, generator=gen).to(device, dt)

    return make


class UNetAdapter:
    """Traces a ``UNet2DConditionModel`` and maps pipeline calls onto the traced graph."""

    input_names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    latent = LATENT_INPUT
    timestep = "timestep"
    name = "unet"

    def __init__(self, unet: nn.Module) -> None:
        config = unet.config
        for field in ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type", "time_cond_proj_dim"):
            if config.get(field) is not None:
                raise _unsupported(field, config.get(field))
        if config.addition_embed_type not in (None, "text_time"):
            raise _unsupported("addition_embed_type", config.addition_embed_type)
        self.unet = unet
        self.uses_added_conditions = config.addition_embed_type == "text_time"
        #: Latent height and width must be multiples of this (the UNet's upsampling factor).
        self.spatial_multiple = 2 ** len([b for b in unet.up_blocks if getattr(b, "upsamplers", None)])

    def example_call(self, latent: int, batch: int) -> dict[str, Any]:
        """Keyword arguments of a ``batch``-row call on a ``latent``-sized latent, as SD/SDXL
        pipelines make them (77 text tokens; SDXL's pooled text and 6 time ids)."""
        config, make = self.unet.config, _tensor_maker(self.unet, batch)
        kwargs: dict[str, Any] = {
            "sample": make(config.in_channels, latent, latent),
            "timestep": make(dt=torch.float32),
            "encoder_hidden_states": make(77, config.cross_attention_dim),
        }
        if self.uses_added_conditions:
            text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": make(text), "time_ids": make(6)}
        return kwargs

    def trace(self) -> fx.GraphModule:
        """Trace the UNet at block granularity; the graph equals ``unet.forward``."""
        root = _UNetForward(self.unet)
        concrete = {} if self.uses_added_conditions else {"text_embeds": None, "time_ids": None}
        graph = drop_concrete_inputs(BlockTracer(default_leaves(self.unet)).trace(root, concrete_args=concrete))
        return fx.GraphModule(root, graph, class_name="TracedUNet")

    def inputs_from_call(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **extra: Any,
    ) -> dict[str, torch.Tensor]:
        """The graph inputs for one ``unet(...)`` call as a diffusers pipeline makes it."""
        unused = sorted(k for k, v in extra.items() if v is not None)
        if unused:
            raise HybridiffError(
                f"the hybrid denoiser does not support UNet arguments {unused}; "
                "run without them (ControlNet, adapters and LoRA scales are not supported yet)"
            )
        h, w = sample.shape[-2:]
        if h % self.spatial_multiple or w % self.spatial_multiple:
            raise HybridiffError(
                f"latent size {h}x{w} is not a multiple of {self.spatial_multiple}; "
                "choose a height and width divisible by the UNet's total up-sampling factor"
            )
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(sample.device)
        inputs = {
            "sample": sample,
            "timestep": timestep.expand(sample.shape[0]),
            "encoder_hidden_states": encoder_hidden_states,
        }
        if self.uses_added_conditions:
            added = added_cond_kwargs or {}
            inputs["text_embeds"] = added["text_embeds"]
            inputs["time_ids"] = added["time_ids"]
        return inputs

    @staticmethod
    def wrap_output(prediction: torch.Tensor, return_dict: bool) -> Any:
        """The prediction in the form ``UNet2DConditionModel.forward`` returns it."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction) if return_dict else (prediction,)


#: The restated forward's image tokens: after the patch embedding (with its positions), in front
#: of the text in every joint attention, up to the output projection.
SD3_TOKENS = TokenLayout(embed="model.pos_embed", out="model.proj_out")


class _SD3Forward(nn.Module):
    """``SD3Transformer2DModel.forward`` restated for fx (no ControlNet, skip layers, IP-adapter)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        m = self.model
        p, c = m.config.patch_size, m.out_channels
        # Shape arithmetic on the input is recomputed by every stage (never cut).
        n, height, width = hidden_states.shape[0], hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        temb = m.time_text_embed(timestep, pooled_projections)
        context = m.context_embedder(encoder_hidden_states)
        x = m.pos_embed(hidden_states)
        for block in m.transformer_blocks:
            out = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
            if block.context_pre_only:  # the last block returns (None, hidden_states)
                x = out[1]
            else:
                context, x = out[0], out[1]
        x = m.proj_out(m.norm_out(x, temb))
        x = x.reshape(n, height, width, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, height * p, width * p)


class SD3Adapter:
    """Traces an ``SD3Transformer2DModel`` (MMDiT, flow matching) at transformer-block level."""

    input_names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    latent = "hidden_states"
    timestep = "timestep"
    name = "sd3-transformer"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def example_call(self, latent: int, batch: int) -> dict[str, Any]:
        """Keyword arguments of a ``batch``-row call on a ``latent``-sized latent, as the SD3
        pipeline makes them: 77 + 77 CLIP tokens and 256 T5 tokens."""
        config, make = self.model.config, _tensor_maker(self.model, batch)
        return {
            "hidden_states": make(config.in_channels, latent, latent),
            "encoder_hidden_states": make(333, config.joint_attention_dim),
            "pooled_projections": make(config.pooled_projection_dim),
            "timestep": make(dt=torch.float32),
        }

    def inputs_from_call(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor | float | int,
        *,
        return_dict: bool = True,
        **extra: Any,
    ) -> dict[str, torch.Tensor]:
        """The graph inputs for one ``transformer(...)`` call as the SD3 pipeline makes it."""
        unused = sorted(k for k, v in extra.items() if v is not None)
        if unused:
            raise HybridiffError(f"the hybrid denoiser does not support SD3 arguments {unused}; run without them")
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=hidden_states.device)
        elif timestep.dim() == 0:
            timestep = timestep[None]
        return {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "timestep": timestep.expand(hidden_states.shape[0]),
        }

    @staticmethod
    def wrap_output(prediction: torch.Tensor, return_dict: bool) -> Any:
        """The prediction in the form ``SD3Transformer2DModel.forward`` returns it."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=prediction) if return_dict else (prediction,)

    def trace(self) -> fx.GraphModule:
        root = _SD3Forward(self.model)
        graph = BlockTracer(default_leaves(self.model)).trace(root)
        return declare_tokens(fx.GraphModule(root, graph, class_name="TracedSD3Transformer"), SD3_TOKENS)


register_adapter(UNet2DConditionModel, UNetAdapter)
register_adapter(SD3Transformer2DModel, SD3Adapter)
