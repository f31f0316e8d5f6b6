"""The layer the compiler and the runtime both stand on: tracing a denoiser with torch.fx
(adapters per model family), opening blocks, executing any subset of the graph, and the
traced pipeline both sides start from. It imports neither the compiler nor the runtime."""

from hybridiff.graph import (
    adapters,  # noqa: F401  (registers the built-in tracing adapters)
    families,  # noqa: F401  (registers the families traced by value)
)
