"""model -> traced graph -> costed graph -> partition -> plan."""

from hybridiff.compiler import adapters  # noqa: F401  (registers the built-in tracing adapters)
