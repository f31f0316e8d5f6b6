"""``hybridiff.parallelize``: a plan run inside the user's own diffusers code."""

from typing import Literal, get_args

from hybridiff.errors import HybridiffError
from hybridiff.plan import Execution

#: How a ``ParallelPipeline`` runs: ``hybrid`` (one rank of the mesh per process), ``emulate``
#: (every rank in this process), ``serial`` (the stock denoiser, observed: the baseline),
#: ``ulysses`` (the stock denoiser under diffusers' own context parallelism on every rank: a peer).
Mode = Literal["hybrid", "emulate", "serial", "ulysses"]
#: Modes whose ranks are launched processes meeting in a torch.distributed world.
DISTRIBUTED: tuple[str, ...] = ("hybrid", "ulysses")


def chosen_execution(requested: str | None, planned: Execution) -> Execution:
    """``parallelize(execution=...)``: ``requested`` (checked), or the plan's ``planned`` when None."""
    if requested is None:
        return planned
    known = get_args(Execution)
    if requested not in known:
        raise HybridiffError(f"execution {requested!r} is not one of {', '.join(known)}")
    return requested  # type: ignore[return-value]
