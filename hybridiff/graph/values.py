"""Trace a model's own ``forward`` with torch.fx while knowing every value on example inputs.

Plain ``torch.fx.symbolic_trace`` stops at the first Python decision that depends on a
tensor (``if txt_ids.ndim == 3``, ``batch, c, h, w = x.shape``, ``for i in range(x.shape[1])``),
which is why diffusers' transformers cannot be traced as written. ``ValueTracer`` runs the
forward on example inputs while it traces: each proxy carries the value its node takes, leaf
blocks are run to get theirs, and a decision on shapes or other metadata (``bool``, ``len``,
``int``, iteration) is settled from the value, as torch.export specialises a guard; a decision
on tensor data fails, as in plain fx. Shape arithmetic used as a value (a
``reshape(batch, tokens, -1)``) stays in the graph, so the graph runs on any number of rows:
the runtime runs stages on one row, the whole call or a shard of the tokens. Tensor dtypes
and devices stay symbolic too, so the graph (and its fingerprint) is the same on every device.

The result is an ordinary ``fx.GraphModule`` at block granularity, as the hand-written
adapters give, so a model family needs only a declaration (``graph.families``), not a
restated forward.
"""

from __future__ import annotations

import builtins
import contextlib
import operator
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

#: Tensor factories that take no tensor argument, so torch cannot route them to a proxy by
#: itself when a size or device argument is one; they are wrapped while tracing.
_FACTORIES = ("arange", "zeros", "ones", "full", "empty", "linspace", "tensor")
#: What fx asserts about ``concrete_args``; the guards are dropped after tracing.
_GUARDS = frozenset({"_assert", "_assert_is_none"})
#: Attributes settled from the value (static for a given model and call shape).
_STATIC_ATTRIBUTES = frozenset({"ndim", "is_cuda", "requires_grad"})


def _settled(proxy: Any) -> Any:
    """The value a Python decision on ``proxy`` is settled with: shapes and other metadata
    only. A decision on tensor data (``if x.mean() > 0``) would be baked into the graph for
    every later input, so it fails as in plain fx."""
    value = _value(proxy)
    if isinstance(value, torch.Tensor):
        raise fx.proxy.TraceError("a Python decision depends on tensor values (data-dependent control flow)")
    return value


def _value(item: Any) -> Any:
    return item.value if isinstance(item, ValueProxy) else item


def _values(tree: Any) -> Any:
    return fx.node.map_aggregate(tree, _value)


class ValueProxy(fx.Proxy):
    """An fx proxy that also holds its node's value on the example inputs."""

    value: Any = None

    def __getattr__(self, name: str) -> Any:
        if name in _STATIC_ATTRIBUTES:
            return getattr(self.value, name)
        return ValueAttribute(self, name)

    def __iter__(self) -> Iterator[ValueProxy]:
        return iter([self[i] for i in range(len(self.value))])

    def __len__(self) -> int:
        return len(self.value)

    def __index__(self) -> int:
        return operator.index(_settled(self))

    def __int__(self) -> int:
        return int(_settled(self))

    def __float__(self) -> float:
        return float(_settled(self))

    def keys(self) -> Any:
        return self.value.keys()


class ValueAttribute(ValueProxy):
    """``proxy.name``: a node only when used as a value; a method call when called."""

    def __init__(self, root: ValueProxy, attr: str) -> None:
        self.root, self.attr, self.tracer = root, attr, root.tracer
        self.value = getattr(root.value, attr)
        self._node: fx.Node | None = None

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._node = self.tracer.create_proxy("call_function", builtins.getattr, (self.root, self.attr), {}).node
        return self._node

    def __call__(self, *args: Any, **kwargs: Any) -> ValueProxy:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)


class ValueTracer(fx.Tracer):
    """Traces ``root`` with ``leaves`` kept opaque, evaluating every node on ``example``
    (the forward's arguments by name, concrete ones included).

    A read of the device or dtype of a tensor computed from ``latent`` is taken from another
    input holding the same (Qwen-Image's rotary embedding asks for ``img_in(x).device``): an
    embedding that needs only the latent's device then does not depend on the latent, so every
    stage recomputes it rather than receiving it."""

    def __init__(self, leaves: set[nn.Module], example: dict[str, Any], latent: str | None = None) -> None:
        super().__init__()
        self.leaves, self.example, self.latent = leaves, example, latent
        #: Tensor inputs other than the latent, whose metadata stands in for computed tensors'.
        self._conditions: list[fx.Proxy] = []
        self._evaluating = False
        self._forwards: list[Callable[..., Any]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> ValueProxy:
        return ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(_settled(obj))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter(obj)

    def keys(self, obj: fx.Proxy) -> Any:
        return _value(obj).keys()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._evaluating:  # inside a leaf being evaluated: run it, record nothing
            return forward(*args, **kwargs)
        self._forwards.append(forward)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._forwards.pop()

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict[str, Any], *rest: Any, **more: Any) -> Any:
        if kind == "call_function" and target is builtins.getattr:
            args = self._metadata_source(*args)
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if kind == "placeholder":
            proxy.value = self.example.get(target)
            if isinstance(proxy.value, torch.Tensor) and target != self.latent:
                self._conditions.append(proxy)
        elif kind == "get_attr":
            self._evaluating = True  # the attribute itself, not another proxy of it
            try:
                proxy.value = operator.attrgetter(target)(self.root)
            finally:
                self._evaluating = False
        elif kind != "output":
            proxy.value = self._evaluate(kind, target, _values(args), _values(kwargs))
            if proxy.value is None:  # e.g. a block's optional output: `x is not None` must see None
                return None
        return proxy

    def _metadata_source(self, source: Any, attr: str, *default: Any) -> tuple:
        """``getattr``'s arguments, with a computed tensor's ``device`` or ``dtype`` read from an
        input that has the same one."""
        if attr not in ("device", "dtype") or not isinstance(source, fx.Proxy) or any(source is c for c in self._conditions):
            return (source, attr, *default)
        wanted = getattr(getattr(source, "value", None), attr, None)
        same = next((c for c in self._conditions if getattr(c.value, attr) == wanted), source)
        return (same, attr, *default)

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if kind == "call_function" and getattr(target, "__name__", "") in _GUARDS:
            return None  # fx's guards on constant arguments: the placeholders hold no values
        self._evaluating = True
        try:
            with torch.no_grad():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return self._forwards[-1](*args, **kwargs)  # call_module: the leaf's own forward
        finally:
            self._evaluating = False

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:  # type: ignore[override]
        with self._factories_traced():
            graph = super().trace(root, concrete_args)
        graph.owning_module = root  # purity checks of call_module nodes look the module up
        graph.eliminate_dead_code()  # what settled decisions computed and nothing reads
        return graph

    @contextlib.contextmanager
    def _factories_traced(self) -> Iterator[None]:
        """``torch.arange(n, device=x.device)`` with a proxy among its arguments becomes a node."""
        originals = {name: getattr(torch, name) for name in _FACTORIES}

        def wrap(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
            def traced(*args: Any, **kwargs: Any) -> Any:
                found = []
                fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
                if found and not self._evaluating:
                    return self.create_proxy("call_function", factory, args, kwargs)
                return factory(*_values(args), **_values(kwargs))

            return traced

        for name, factory in originals.items():
            setattr(torch, name, wrap(name, factory))
        try:
            yield
        finally:
            for name, factory in originals.items():
                setattr(torch, name, factory)
