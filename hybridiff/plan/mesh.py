"""How a plan uses its devices: replicas, guidance branch groups, pipeline stages, shard peers,
and which rows of a denoiser call each position computes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hybridiff.errors import HybridiffError
from hybridiff.plan.strict import Strict

#: What a mesh position computes: one guidance branch (cfg = 2) or the whole CFG batch (cfg = 1).
Branch = Literal["uncond", "cond", "both"]


class Mesh(Strict):
    """How N devices are used: ``dp`` replicas x ``cfg`` branch groups x ``pp`` pipeline stages.

    A replica is ``cfg * pp`` consecutive ranks (replica d, position s is rank
    ``d * cfg * pp + s``); ranks beyond ``dp * cfg * pp`` stay idle. With ``cfg = 2`` positions
    ``0..pp-1`` serve the unconditional branch and ``pp..2pp-1`` the conditional one; with
    ``cfg = 1`` every position serves the whole CFG batch (or the only branch without guidance).

    The rows of a denoiser call (the pipeline's CFG batch, ``[uncond; cond]``) are shared out
    here, so the runtime executes and the simulator predicts the same assignment:
    outside the window a group's rows are split into contiguous chunks, one per member, and
    inside it stage ``s`` runs on ``window_rows(s)``.
    """

    world_size: int = Field(ge=1)
    dp: int = Field(ge=1, description="replicas, each generating different images")
    cfg: Literal[1, 2] = Field(description="2: one group per guidance branch; 1: groups serve both")
    pp: int = Field(ge=1, description="devices per branch group = pipeline stages per group")
    batch: int = Field(default=1, ge=1, description="images the plan was costed for")
    sp: int = Field(default=1, ge=1, description="members of a branch group splitting one row's image tokens on full steps")

    @model_validator(mode="after")
    def _fits(self) -> Mesh:
        if self.dp * self.cfg * self.pp > self.world_size:
            raise ValueError(f"mesh {self.label} needs {self.dp * self.cfg * self.pp} devices, more than world_size {self.world_size}")
        if self.members % self.sp:
            raise ValueError(f"mesh {self.label}: sp={self.sp} must divide the {self.members} members of a branch group")
        return self

    @property
    def label(self) -> str:
        return f"dp={self.dp},cfg={self.cfg},pp={self.pp}" + (f",sp={self.sp}" if self.sp > 1 else "")

    @property
    def members(self) -> int:
        """Positions of one branch group (all of a replica's when ``cfg = 1``)."""
        return self.pp if self.cfg == 2 else self.replica_size

    @property
    def replica_size(self) -> int:
        """Ranks per replica, which is also the number of pipeline stages."""
        return self.cfg * self.pp

    def check_guided(self, guided: bool) -> None:
        """A run without guidance has no branches for a cfg=2 mesh to split: one line, no hang."""
        if self.cfg == 2 and not guided:
            raise HybridiffError(
                f"the plan's mesh {self.label} splits the guidance branches but this run has no "
                "guidance (guidance_scale <= 1); use a guidance scale > 1 or compile a cfg=1 plan"
            )

    @property
    def idle_ranks(self) -> list[int]:
        return list(range(self.dp * self.replica_size, self.world_size))

    @property
    def images_per_call(self) -> int:
        """Images a replica denoises together in one pipeline call."""
        return -(-self.batch // self.dp)

    def replica_images(self, images: int) -> list[list[int]]:
        """Image indices per replica, split into the pipeline calls each replica makes:
        round-robin over replicas, ``images_per_call`` together. The runtime generates them
        so and the simulator predicts them so."""
        per_call = self.images_per_call
        mine = [list(range(d, images, self.dp)) for d in range(self.dp)]
        return [[m[i : i + per_call] for i in range(0, len(m), per_call)] for m in mine]

    def rank(self, replica: int, position: int) -> int:
        return replica * self.replica_size + position

    def replica_ranks(self, replica: int) -> tuple[int, ...]:
        return tuple(self.rank(replica, s) for s in range(self.replica_size))

    def locate(self, rank: int) -> tuple[int, int] | None:
        """(replica, position) of ``rank``, or None for an idle rank."""
        if rank >= self.dp * self.replica_size:
            return None
        return divmod(rank, self.replica_size)

    def branch_of(self, position: int) -> Branch:
        if self.cfg == 1:
            return "both"
        return "uncond" if position < self.pp else "cond"

    def group_rows(self, position: int, rows: int) -> range:
        """The rows of a call of ``rows`` that ``position``'s branch group is responsible for."""
        branch = self.branch_of(position)
        half = rows // 2
        return {"both": range(rows), "uncond": range(half), "cond": range(half, rows)}[branch]

    def computed_rows(self, position: int, rows: int) -> range:
        """The rows ``position`` works on in a fully connected step (may be empty): a group's rows
        are split into contiguous chunks, one per ``sp`` consecutive members, which split each
        row's image tokens among them (each member its ``shard_index``)."""
        group = self.group_rows(position, rows)
        chunks = self.members // self.sp
        index = position % self.members // self.sp
        size, extra = divmod(len(group), chunks)
        start = group.start + index * size + min(index, extra)
        return range(start, start + size + (index < extra))

    def shard_index(self, position: int) -> int:
        """Which ``1/sp`` of each row's image tokens ``position`` computes on a full step."""
        return position % self.members % self.sp

    def shard_peers(self, position: int) -> tuple[int, ...]:
        """The positions sharing ``position``'s rows token by token, in shard order."""
        first = position - self.shard_index(position)
        return tuple(range(first, first + self.sp))

    def shard_groups(self) -> list[tuple[int, ...]]:
        """Every row chunk's shard peers, as ranks (none unless ``sp > 1``)."""
        firsts = [s for s in range(self.replica_size) if self.shard_index(s) == 0] if self.sp > 1 else []
        return [tuple(self.rank(d, p) for p in self.shard_peers(s)) for d in range(self.dp) for s in firsts]

    def full_rows(self, position: int, rows: int) -> range:
        """The rows whose prediction and cut tensors ``position`` holds whole after a fully
        connected step: its computed rows, held by the first of their ``sp`` shard peers."""
        computed = self.computed_rows(position, rows)
        return computed if self.shard_index(position) == 0 else range(computed.start, computed.start)

    def window_rows(self, position: int, rows: int, window_guidance: str) -> range:
        """The rows stage ``position`` runs in the window: its own branch ("mixed", the paper),
        the conditional branch ("cached"), or the whole batch (cfg = 1)."""
        if self.cfg == 1:
            return range(rows)
        return self.group_rows(position if window_guidance == "mixed" else self.replica_size - 1, rows)
