"""Trace a diffusers denoiser into a torch.fx graph whose nodes are its blocks.

``torch.fx.symbolic_trace`` cannot trace ``UNet2DConditionModel.forward`` as written: it
iterates ``sample.shape`` and branches on optional arguments. The adapter below restates that
forward for the one configuration at hand (a plain Python function of the config, so the
branches are resolved while tracing) and traces it with a tracer that keeps each top-level
block opaque. The result is a graph of a few dozen nodes that computes exactly what the model
computes, which the compiler costs and partitions and the runtime executes piecewise.

The graph takes the denoiser's inputs as flat named tensors (see ``UNetAdapter.input_names``);
``inputs_from_call`` turns a diffusers pipeline's ``unet(...)`` call into that form, so the
runtime can stand in for the UNet inside a stock pipeline.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import torch
from diffusers import UNet2DConditionModel
from torch import fx, nn

from hybridiff.errors import HybridiffError

#: The graph input carrying the noisy latent. Everything downstream of it is the heavy part
#: that gets partitioned; nodes that do not depend on it are cheap per-step embeddings.
LATENT_INPUT = "sample"


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


class _BlockTracer(fx.Tracer):
    """A tracer that treats the given modules as opaque leaves."""

    def __init__(self, leaves: set[nn.Module]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self._leaves or super().is_leaf_module(m, module_qualified_name)


def _unsupported(field: str, value: Any) -> HybridiffError:
    return HybridiffError(
        f"unsupported UNet config: {field}={value!r}; hybridiff traces UNet2DConditionModel "
        "without class/image/hint conditioning (SD1.x, SD2.x, SDXL text_time)"
    )


class UNetAdapter:
    """Traces a ``UNet2DConditionModel`` and maps pipeline calls onto the traced graph."""

    input_names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    latent = LATENT_INPUT

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

    def trace(self) -> fx.GraphModule:
        """Trace the UNet at block granularity; the graph equals ``unet.forward``."""
        root = _UNetForward(self.unet)
        concrete = {} if self.uses_added_conditions else {"text_embeds": None, "time_ids": None}
        graph = _BlockTracer(_default_leaves(self.unet)).trace(root, concrete_args=concrete)
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


Leaf = Union[nn.Module, str, type]
#: Module classes with a hand-written tracing adapter: ``factory(module) -> adapter`` where the
#: adapter has ``trace() -> fx.GraphModule`` and a ``latent`` attribute naming the latent input.
ADAPTERS: dict[type, Callable[[nn.Module], Any]] = {}


def register_adapter(cls: type, factory: Callable[[nn.Module], Any]) -> None:
    """Trace every instance of ``cls`` with ``factory(instance).trace()`` instead of torch.fx."""
    ADAPTERS[cls] = factory


def _default_leaves(model: nn.Module) -> set[nn.Module]:
    """Block granularity: the model's children, with module lists opened one level."""
    leaves: set[nn.Module] = set()
    for child in model.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            leaves.update(child)
        else:
            leaves.add(child)
    return leaves


def _resolve_leaves(model: nn.Module, leaves: Iterable[Leaf]) -> set[nn.Module]:
    named = dict(model.named_modules())
    out: set[nn.Module] = set()
    for leaf in leaves:
        if isinstance(leaf, nn.Module):
            out.add(leaf)
        elif isinstance(leaf, str):
            if leaf not in named:
                raise HybridiffError(f"leaf {leaf!r} is not a submodule of {type(model).__name__}; use a name from named_modules()")
            out.add(named[leaf])
        else:
            out.update(m for m in named.values() if isinstance(m, leaf))
    return out


def _where(error: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's line that broke tracing."""
    torch_dir = Path(torch.__file__).parent
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not Path(f.filename).is_relative_to(torch_dir)]
    if not frames:
        return "an unknown line"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"


def trace_module(
    model: nn.Module,
    example_inputs: tuple | dict[str, Any],
    leaves: Iterable[Leaf] | None = None,
) -> fx.GraphModule:
    """Trace any denoiser into an fx graph whose placeholders are its forward's arguments.

    Order of attempts: a registered adapter for the model's class; torch.fx with the given (or
    default: block-level) leaves; torch.export's graph, which handles shape-dependent Python
    control flow. When none works, the error names the line that broke tracing and the fixes.
    """
    for cls in type(model).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls](model).trace()
    params = list(inspect.signature(model.forward).parameters.values())
    given = set(example_inputs) if isinstance(example_inputs, dict) else {p.name for p in params[: len(example_inputs)]}
    concrete = {p.name: p.default for p in params if p.name not in given and p.default is not inspect.Parameter.empty}
    leaf_set = _default_leaves(model) if leaves is None else _resolve_leaves(model, leaves)
    try:
        graph = _BlockTracer(leaf_set).trace(model, concrete_args=concrete or None)
        return fx.GraphModule(model, graph, class_name=f"Traced{type(model).__name__}")
    except Exception as fx_error:  # noqa: BLE001 - any tracing failure falls back to export
        args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
        logging.disable(logging.CRITICAL)  # export logs each failed guard with its whole graph
        try:
            return torch.export.export(model, args, kwargs, strict=False).module()
        except Exception:  # noqa: BLE001 - report the fx failure, which names the user's line
            first = str(fx_error).strip().splitlines()[0] if str(fx_error).strip() else type(fx_error).__name__
            raise HybridiffError(
                f"cannot trace {type(model).__name__}: {first} at {_where(fx_error)}; mark the module "
                "holding that line as a leaf (leaves=[...]), register a tracing adapter "
                "(hybridiff.register_adapter), or make the argument concrete"
            ) from None
        finally:
            logging.disable(logging.NOTSET)


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's structure and its leaves' parameter shapes, not of weights.

    Two checkpoints of one architecture share a fingerprint; a plan is refused by a model
    whose graph differs in any node, edge, leaf class or parameter shape.
    """
    h = hashlib.sha256()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
        h.update(f"{node.op}|{node.name}|{target}|{node.args}|{sorted(node.kwargs.items())}\n".encode())
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            h.update(type(module).__qualname__.encode())
            for pname, p in module.named_parameters():
                h.update(f"{pname}:{tuple(p.shape)}".encode())
    return h.hexdigest()[:16]


class _Captured(Exception):
    """Raised from a forward pre-hook to stop the pipeline once the denoiser's inputs are seen."""


def capture_denoiser_call(pipe: Any, height: int, width: int, guidance_scale: float) -> tuple[tuple, dict]:
    """The arguments a stock pipeline passes to its UNet on the first denoising step.

    Running the pipeline's own preprocessing (text encoders, added time ids, latent
    preparation) gives example inputs of exactly the shapes and dtypes the runtime will see,
    without any model-specific knowledge here.
    """
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["call"] = (args, kwargs)
        raise _Captured

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(
            prompt="an example prompt",
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["call"]


register_adapter(UNet2DConditionModel, UNetAdapter)
