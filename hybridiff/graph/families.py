"""Denoiser families described as data: which argument is the latent, what the prediction
looks like, and the model's own forward traced by ``ValueTracer`` at block granularity.

A family needs no restated forward: ``FamilyAdapter`` traces ``model.forward`` on one example
call (the pipeline's first denoiser call), with every tensor argument a graph input and every
other argument (``return_dict``, ``joint_attention_kwargs=None``, ...) a constant. A later
call must give the same constants, or it is refused in one line naming the argument.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import fx, nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.tokens import TokenLayout, TokenTable, declare_tokens
from hybridiff.graph.trace import default_leaves, drop_concrete_inputs, register_adapter
from hybridiff.graph.values import ValueTracer


def _transformer_output(prediction: torch.Tensor, return_dict: bool) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=prediction) if return_dict else (prediction,)


@dataclass(frozen=True)
class Family:
    """How hybridiff reads one denoiser class."""

    #: What a plan calls it (``ModelRef.denoiser``).
    name: str
    #: The forward argument holding the noisy latent.
    latent: str
    #: The forward argument holding the step's timestep.
    timestep: str = "timestep"
    #: Arguments traced as constants whatever the call says (the prediction as a tuple).
    fixed: dict[str, Any] = field(default_factory=lambda: {"return_dict": False})
    #: The prediction as the model returns it, from the tensor and the call's ``return_dict``.
    output: Callable[[torch.Tensor, bool], Any] = _transformer_output
    #: Conditions whose length follows the prompt (Qwen-Image trims the text to its tokens), with
    #: the mask argument marking their tokens. Every call is padded, under the mask, to the
    #: length the graph was traced at (the longest a call can bring), so shapes are the plan's
    #: and both guidance branches stack; a call without the mask gets one of ones.
    masks: dict[str, str] = field(default_factory=dict)
    #: List arguments holding one entry per image, all equal (Qwen-Image's ``img_shapes``): a
    #: call matches the trace at any row count when its entries equal the traced one.
    row_lists: tuple[str, ...] = ()
    #: Where the image tokens form one sequence only attention mixes (sequence parallelism);
    #: None: no token split.
    tokens: TokenLayout | None = None


class FamilyAdapter:
    """Traces a family's model on an example call and maps later calls onto the graph."""

    #: ``trace`` needs an example call (``graph.pipeline.trace_pipeline`` captures one).
    traced_on_call = True

    def __init__(self, family: Family, model: nn.Module) -> None:
        self.family, self.model, self.name = family, model, family.name
        self.latent, self.timestep = family.latent, family.timestep
        self.signature = inspect.signature(model.forward)
        #: The call's non-tensor arguments the graph was traced with (set by ``trace``).
        self.constants: dict[str, Any] = {}
        #: Per masked condition (``Family.masks``), the length calls are padded to (set by ``trace``).
        self.lengths: dict[str, int] = {}

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every forward argument of a call by name, defaults filled in."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise HybridiffError(f"{type(self.model).__name__} cannot be called so: {e}") from None
        bound.apply_defaults()
        call = {**bound.arguments, **self.family.fixed}
        for condition, mask in self.family.masks.items():
            if isinstance(call.get(condition), torch.Tensor):
                call = pad_under_mask(call, condition, mask, self.lengths.get(condition, call[condition].shape[1]))
        return call

    def trace(self, example_call: tuple[tuple, dict[str, Any]]) -> fx.GraphModule:
        """The model's forward as a block-level graph, evaluated on ``example_call``."""
        self.lengths = {}
        call = self.bind(*example_call)
        self.lengths = {c: call[c].shape[1] for c in self.family.masks if isinstance(call.get(c), torch.Tensor)}
        self.constants = {k: v for k, v in call.items() if not isinstance(v, torch.Tensor)}
        tracer = ValueTracer(default_leaves(self.model), call, latent=self.latent)
        graph = drop_concrete_inputs(tracer.trace(self.model, concrete_args=dict(self.constants)))
        _unwrap_single_output(graph)
        return declare_tokens(fx.GraphModule(self.model, graph, class_name=f"Traced{type(self.model).__name__}"), self.family.tokens)

    def inputs_from_call(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The graph inputs of one call; its other arguments must be the traced constants."""
        call = self.bind(args, kwargs)
        for name, traced in self.constants.items():
            given = call.get(name)
            if name in self.family.row_lists and isinstance(given, list) and given and all(_same(e, traced[0]) for e in given):
                continue
            if not _same(given, traced):
                raise HybridiffError(
                    f"the hybrid denoiser traced {type(self.model).__name__} with {name}={_short(traced)} but this "
                    f"call passes {_short(call.get(name))}; call it as it was traced (a plan fixes such arguments)"
                )
        return {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}

    def wrap_output(self, prediction: torch.Tensor, return_dict: bool) -> Any:
        return self.family.output(prediction, return_dict)


class ModuleAdapter:
    """Maps calls of any traced ``nn.Module`` onto its graph: the call's arguments bound to
    the forward's signature, those the graph takes by name; the prediction returned as is."""

    name = "custom"

    def __init__(self, model: nn.Module, graph: fx.GraphModule, latent: str, timestep: str | None = None) -> None:
        self.model, self.latent, self.timestep = model, latent, timestep or ""
        self.signature = inspect.signature(model.forward)
        self.inputs = [n.name for n in graph.graph.nodes if n.op == "placeholder"]

    def inputs_from_call(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise HybridiffError(f"{type(self.model).__name__} cannot be called so: {e}") from None
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k in self.inputs}

    @staticmethod
    def wrap_output(prediction: torch.Tensor, return_dict: bool) -> torch.Tensor:
        return prediction


def _unwrap_single_output(graph: fx.Graph) -> None:
    """A forward returning ``(prediction,)`` gives the graph the prediction itself."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        output.args = (value[0],)


def pad_under_mask(call: dict[str, Any], condition: str, mask: str, length: int) -> dict[str, Any]:
    """``call`` with ``condition`` ``[rows, tokens, ...]`` padded with masked-out zeros to
    ``length`` tokens and its mask given (ones where the call gave none)."""
    value = call[condition]
    tokens = value.shape[1]
    if tokens > length:
        raise HybridiffError(
            f"this call's {condition} has {tokens} tokens but the plan was traced for at most {length}; "
            "give the pipeline max_sequence_length <= the plan's, or compile with a larger one"
        )
    marks = call.get(mask)
    if marks is None:
        marks = torch.ones(value.shape[:2], dtype=torch.long, device=value.device)
    if tokens < length:
        value = torch.cat([value, value.new_zeros(value.shape[0], length - tokens, *value.shape[2:])], 1)
        marks = torch.cat([marks, marks.new_zeros(marks.shape[0], length - tokens)], 1)
    return {**call, condition: value, mask: marks}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if type(a) is type(b) else False
    except Exception:  # noqa: BLE001 - values that cannot be compared are different
        return a is b


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


FLUX = Family(
    name="flux", latent="hidden_states", tokens=TokenLayout("x_embedder", tables=(TokenTable("pos_embed", 0),), text="before")
)
WAN = Family(name="wan", latent="hidden_states", tokens=TokenLayout("patch_embedding", tables=(TokenTable("rope", 1),), text="apart"))
#: No token split: the mix-FFN's depthwise convolution mixes neighbouring tokens.
SANA = Family(name="sana", latent="hidden_states")
QWEN_IMAGE = Family(
    name="qwen-image",
    latent="hidden_states",
    masks={"encoder_hidden_states": "encoder_hidden_states_mask"},
    row_lists=("img_shapes",),
    tokens=TokenLayout("img_in", tables=(TokenTable("pos_embed", 0, element=0),), text="before"),
)


def _register() -> None:
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SanaTransformer2DModel, WanTransformer3DModel

    register_adapter(FluxTransformer2DModel, partial(FamilyAdapter, FLUX))
    register_adapter(WanTransformer3DModel, partial(FamilyAdapter, WAN))
    register_adapter(QwenImageTransformer2DModel, partial(FamilyAdapter, QWEN_IMAGE))
    register_adapter(SanaTransformer2DModel, partial(FamilyAdapter, SANA))


_register()
