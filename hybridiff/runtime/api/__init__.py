"""``hybridiff.parallelize``: a plan run inside the user's own diffusers code."""

from typing import Literal

#: How a ``ParallelPipeline`` runs: ``hybrid`` (one rank of the mesh per process), ``emulate``
#: (every rank in this process), ``serial`` (the stock denoiser, observed: the baseline).
Mode = Literal["hybrid", "emulate", "serial"]
