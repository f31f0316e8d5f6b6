"""Every rank's checks and call arguments agreed in one exchange: a mistake on one rank stops
every rank with the same line, never a hang (``ParallelPipeline``)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from hybridiff.errors import HybridiffError, one_line
from hybridiff.runtime.api import calls


class Agreement:
    """Agreement among the ranks of a run (``distributed``: a torch.distributed world; else
    this one process is every rank)."""

    def __init__(self, rank: int, distributed: bool) -> None:
        self.rank, self.distributed = rank, distributed

    def agreed(self, work: Callable[[], Any], compare: bool = False) -> Any:
        """Run this rank's ``work`` (checks that may fail with a one-line error) and exchange the
        outcome with every rank: one rank's problem stops every rank, with that line. With
        ``compare``, ``work``'s result is a call whose arguments must match rank 0's."""
        result, problem = None, None
        try:
            result = work()
        except HybridiffError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - peers must hear of it, or they wait for this rank
            problem = f"rank {self.rank} failed: {one_line(e)}"
        unseeded = compare and result is not None and result.get("generator") is None and result.get("latents") is None
        said = {"problem": problem, "seed": int(torch.randint(0, 2**62, ())) if unseeded else None}
        if compare and result is not None:
            said["digest"] = calls.digest(result)
        everyone = self.exchange(said)
        for rank, theirs in enumerate(everyone):
            if theirs["problem"]:
                mine = theirs["problem"] == problem
                raise HybridiffError(theirs["problem"] if mine else f"rank {rank}: {theirs['problem']}")
        if compare:
            check_same([e["digest"] for e in everyone])
        if unseeded:  # rank 0's seed, so every rank of a replica starts from the same noise
            images, _ = calls.image_count(result)
            result["generator"] = [torch.Generator("cpu").manual_seed(everyone[0]["seed"] + i) for i in range(images)]
        return result

    def exchange(self, mine: Any) -> list[Any]:
        """``mine`` from every rank, in rank order (just ``[mine]`` in one process)."""
        if not self.distributed:
            return [mine]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone


def check_same(digests: list[dict[str, str]], called: str = "the pipeline") -> None:
    """Every rank's call digests (``calls.digest``) equal rank 0's, or one line naming the argument."""
    for rank, theirs in enumerate(digests[1:], 1):
        differs = sorted(k for k in set(theirs) | set(digests[0]) if theirs.get(k) != digests[0].get(k))
        if differs:
            raise HybridiffError(
                f"rank {rank} called {called} with a different {differs[0]!r} than rank 0: every rank must make "
                "the same calls, with the same prompts, generators and arguments (see docs/api.md)"
            )

