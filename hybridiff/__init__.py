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
