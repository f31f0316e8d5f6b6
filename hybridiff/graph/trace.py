"""Trace a denoiser into a torch.fx graph whose nodes are its blocks.

The graph is what the compiler costs and partitions and what the runtime executes piecewise.
Models of a known class go through a registered adapter (``hybridiff.graph.adapters``);
anything else is traced with torch.fx, keeping its children (or user-named modules) opaque,
or failing that through torch.export. The fingerprint identifies a graph across processes so
the runtime can refuse a plan compiled for another model.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import torch
from torch import fx, nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.values import ValueTracer

#: The graph input carrying the noisy latent, unless a plan names another. Everything
#: downstream of it is the heavy part that gets partitioned; nodes that do not depend on it are
#: cheap per-step embeddings.
LATENT_INPUT = "sample"


class BlockTracer(fx.Tracer):
    """A tracer that treats the given modules as opaque leaves."""

    def __init__(self, leaves: set[nn.Module]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self._leaves or super().is_leaf_module(m, module_qualified_name)


Leaf = Union[nn.Module, str, type]
#: Module classes with a hand-written tracing adapter: ``factory(module) -> adapter`` where the
#: adapter has ``trace() -> fx.GraphModule``, ``inputs_from_call(*args, **kwargs)`` mapping the
#: model's call arguments to graph inputs, and a ``latent`` attribute naming the latent input.
ADAPTERS: dict[type, Callable[[nn.Module], Any]] = {}


def register_adapter(cls: type, factory: Callable[[nn.Module], Any]) -> None:
    """Trace every instance of ``cls`` with ``factory(instance).trace()`` instead of torch.fx."""
    ADAPTERS[cls] = factory


def registered_adapter(model: nn.Module) -> Any | None:
    """The adapter registered for ``model``'s class or nearest base class, or None."""
    return next((ADAPTERS[cls](model) for cls in type(model).__mro__ if cls in ADAPTERS), None)


def adapter_for(model: nn.Module) -> Any:
    """The registered adapter for ``model``'s class (or a base class), or a one-line error."""
    adapter = registered_adapter(model)
    if adapter is not None:
        return adapter
    raise HybridiffError(
        f"no tracing adapter for {type(model).__name__}; pipelines run with UNet2DConditionModel or "
        "SD3Transformer2DModel denoisers, or one registered with hybridiff.register_adapter"
    )


def default_leaves(model: nn.Module) -> set[nn.Module]:
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


@dataclass(frozen=True)
class TracedGraph:
    """A traced denoiser with example inputs keyed by the graph's input names."""

    graph: fx.GraphModule
    inputs: dict[str, Any]
    #: The input carrying the latent when the tracer knows it (adapters), else None.
    latent: str | None


def trace_module(
    model: nn.Module,
    example_inputs: tuple | dict[str, Any],
    leaves: Iterable[Leaf] | None = None,
) -> TracedGraph:
    """Trace any denoiser into an fx graph and name its example inputs.

    Order of attempts: a registered adapter for the model's class (``example_inputs`` are the
    model's own call arguments); torch.fx with the given (or default: block-level) leaves;
    the same traced by value (``graph.values``: Python decisions on shapes settled from the
    example); torch.export's graph. When none works, the error names the line that broke
    plain tracing and the fixes.
    """
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    adapter = registered_adapter(model)
    if adapter is not None:
        graph = adapter.trace((args, kwargs)) if getattr(adapter, "traced_on_call", False) else adapter.trace()
        return TracedGraph(graph, adapter.inputs_from_call(*args, **kwargs), adapter.latent)
    params = inspect.signature(model.forward).parameters
    given = set(kwargs) | set(list(params)[: len(args)])
    concrete = {n: p.default for n, p in params.items() if n not in given and p.default is not inspect.Parameter.empty}
    example = {**dict(zip(params, args)), **kwargs, **concrete}
    leaf_set = default_leaves(model) if leaves is None else _resolve_leaves(model, leaves)
    attempts = [
        lambda: BlockTracer(leaf_set).trace(model, concrete_args=concrete or None),
        lambda: ValueTracer(leaf_set, example).trace(model, concrete_args=concrete or None),
    ]
    failure: BaseException | None = None
    for attempt in attempts:
        try:
            gm = fx.GraphModule(model, drop_concrete_inputs(attempt()), class_name=f"Traced{type(model).__name__}")
            break
        except Exception as error:  # noqa: BLE001 - any tracing failure falls back to the next way
            failure = failure or error
    else:
        gm = _exported(model, args, kwargs, failure)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {n: kwargs[n] for n in names if n in kwargs} if kwargs else dict(zip(names, args))
    return TracedGraph(gm, inputs, None)


def _exported(model: nn.Module, args: tuple, kwargs: dict[str, Any], fx_error: BaseException) -> fx.GraphModule:
    """torch.export's graph of ``model``, or one line naming the line that broke fx tracing."""
    logging.disable(logging.CRITICAL)  # export logs and prints each failed guard's whole graph
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
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


def drop_concrete_inputs(graph: fx.Graph) -> fx.Graph:
    """Remove the placeholders torch.fx adds for ``concrete_args`` and the guards on them.

    The values were settled while tracing, so the graph takes only the inputs it uses and
    callers feed it by name without knowing which optional arguments were specialised.
    """
    concrete = {n for n in graph.nodes if n.op == "placeholder" and n.args}  # placeholders with a default
    guards = {"_assert", "_assert_is_none", "eq"}
    changed = True
    while changed:  # guards form short chains: eq(flag, True) -> _assert(eq, ...)
        changed = False
        for node in list(graph.nodes):
            if (
                node.op == "call_function"
                and getattr(node.target, "__name__", "") in guards
                and not node.users
                and all(p in concrete or p.op == "call_function" for p in node.all_input_nodes)
                and any(p in concrete for p in _ancestors(node))
            ):
                graph.erase_node(node)
                changed = True
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users:
            graph.erase_node(node)
    graph.set_codegen(fx.graph.CodeGen())  # a plain forward of the inputs left, not the traced signature
    return graph


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


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


def denoiser_attr(pipe: Any) -> str:
    for attr in ("unet", "transformer"):
        if getattr(pipe, attr, None) is not None:
            return attr
    raise HybridiffError(f"{type(pipe).__name__} has neither a unet nor a transformer; hybridiff drives denoising pipelines")


Call = tuple[tuple, dict]


def _skipped(*args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
    """A captured call before the last one (the first branch of two) is not computed: at
    8192x8192 one forward takes hours, and only its arguments are wanted."""
    return (torch.zeros_like(next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))),)


def capture_denoiser_calls(
    pipe: Any, height: int, width: int, calls: int = 1, prompt: str = "an example prompt", **pipeline_kwargs: Any
) -> list[Call]:
    """The arguments of the first ``calls`` calls a stock pipeline makes to its denoiser
    (the two guidance branches of the first step, for pipelines calling it twice per step).

    Running the pipeline's own preprocessing (text encoders, added time ids, latent
    preparation) gives example inputs of exactly the shapes and dtypes the runtime will see,
    without any model-specific knowledge here. ``pipeline_kwargs`` set the guidance. The
    pipeline's warnings (a prompt truncated, a negative prompt unused) are not shown: the call
    is hybridiff's own.
    """
    from diffusers.utils import logging as diffusers_logging

    seen: list[Call] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        if len(seen) == calls:
            raise _Captured

    denoiser = getattr(pipe, denoiser_attr(pipe))
    own_forward = denoiser.__dict__.get("forward")  # accelerate's offload hooks set one
    denoiser.forward = _skipped
    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.ERROR)
    try:
        pipe(
            prompt=prompt,
            num_inference_steps=1,
            height=height,
            width=width,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **pipeline_kwargs,
        )
    except _Captured:
        pass  # the denoiser calls were seen; the rest of the pipeline is not needed
    except (TypeError, ValueError) as e:
        if seen:
            raise
        said = str(e) if len(str(e)) <= 70 else str(e)[:67] + "..."
        raise HybridiffError(
            f"{type(pipe).__name__} cannot generate from a prompt alone ({type(e).__name__}: {said}); hybridiff runs "
            "text-to-image and text-to-video pipelines (ControlNet, image-to-image and inpainting are not supported yet)"
        ) from None
    finally:
        handle.remove()
        if own_forward is None:
            del denoiser.forward
        else:
            denoiser.forward = own_forward
        diffusers_logging.set_verbosity(level)
    if len(seen) < calls:
        raise HybridiffError(f"{type(pipe).__name__} called its denoiser {len(seen)} time(s) in a step, not {calls}")
    return seen
