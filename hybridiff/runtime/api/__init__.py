"""``hybridiff.parallelize``: a plan run inside the user's own diffusers code."""

from typing import Literal

#: How a ``ParallelPipeline`` runs: ``hybrid`` (one rank of the mesh per process), ``emulate``
#: (every rank in this process), ``serial`` (the stock denoiser, observed: the baseline),
#: ``ulysses`` (the stock denoiser under diffusers' own context parallelism on every rank: a peer).
Mode = Literal["hybrid", "emulate", "serial", "ulysses"]
#: Modes whose ranks are launched processes meeting in a torch.distributed world.
DISTRIBUTED: tuple[str, ...] = ("hybrid", "ulysses")

