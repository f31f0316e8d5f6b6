"""hybridiff: hybrid data/pipeline-parallel diffusion inference.

Compile a denoiser into a plan (``hybridiff.compiler``), execute it on several devices
(``hybridiff.runtime``); ``hybridiff.plan`` is the contract between the two.
"""

import os

__version__ = "0.1.0"


def quiet_libraries() -> None:
    """Silence import-time advice from transformers/diffusers in command-line runs."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


_API = {
    "compile": ("hybridiff.compiler.entries", "compile_module"),
    "CompileOptions": ("hybridiff.compiler.options", "CompileOptions"),
    "check_plan": ("hybridiff.compiler.check", "check_plan"),
    "load_plan": ("hybridiff.plan", "load_plan"),
    "Plan": ("hybridiff.plan", "Plan"),
    "register_adapter": ("hybridiff.graph.trace", "register_adapter"),
    "parallelize": ("hybridiff.runtime.api.parallel", "parallelize"),
    "ParallelPipeline": ("hybridiff.runtime.api.parallel", "ParallelPipeline"),
    "HybridiffError": ("hybridiff.errors", "HybridiffError"),
}


def __getattr__(name: str):  # noqa: ANN202 - lazy, so `import hybridiff` stays light
    """The Python API: ``hybridiff.compile``, ``check_plan``, ``load_plan``, ``register_adapter``,
    ``parallelize``."""
    if name not in _API:
        raise AttributeError(f"module 'hybridiff' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
