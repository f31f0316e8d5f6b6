"""What step programs are built from: a mesh, the links between its stages and what shard
peers split. ``Layout.of(plan)`` reads it from a plan; the compiler builds one for each mesh it
compares before any plan exists (``compiler.costing``), so the simulator costs candidates with
the very programs the runtime would execute."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hybridiff.plan import CutTensor, Mesh, PatchSplit, Plan, TokenSplit, links_of


@dataclass(frozen=True)
class Link:
    """Cut tensors one stage sends another on every window step, in the order they travel."""

    producer: int
    consumer: int
    cuts: tuple[str, ...]
    bytes_per_row: int


@dataclass(frozen=True)
class Layout:
    """Everything a step program depends on: who computes which rows (``mesh``), what the
    window's stages send each other (``links``), where the output is, and what shard peers split."""

    mesh: Mesh
    window_guidance: str
    links: tuple[Link, ...]
    output_stage: int
    #: The denoiser output of one row: what the prediction exchanges move per row.
    prediction_bytes: int
    #: How ``mesh.sp`` shard peers split a row (None without ``sp``).
    split: TokenSplit | PatchSplit | None = None
    #: Cut tensors each shard peer holds only a share of after a full step (joined at the hand-off).
    shard_cuts: tuple[str, ...] = ()
    #: Bytes of those shares one peer holds for one row.
    shard_bytes_per_row: int = 0
    #: Cut tensors without a batch dimension (graphs specialised to one row).
    unbatched: tuple[str, ...] = ()

    @classmethod
    def of(cls, plan: Plan) -> Layout:
        return cls.build(
            plan.mesh,
            plan.schedule.window_guidance,
            plan.cut_tensors,
            output_stage=plan.output_stage,
            prediction_bytes=plan.estimates.prediction_bytes,
            split=plan.graph.shard_split,
        )

    @classmethod
    def build(
        cls,
        mesh: Mesh,
        window_guidance: str,
        cut_tensors: list[CutTensor],
        *,
        output_stage: int,
        prediction_bytes: int,
        split: TokenSplit | PatchSplit | None,
    ) -> Layout:
        """The layout of stages joined by ``cut_tensors`` (the plan's, or a candidate's)."""
        sent = [c for c in cut_tensors if c.constant is None]
        links = links_of(cut_tensors)
        split = split if mesh.sp > 1 else None
        sharded = [c for c in sent if split is not None and c.shard_dim is not None]
        return cls(
            mesh=mesh,
            window_guidance=window_guidance,
            links=tuple(Link(p, c, tuple(t.node for t in cuts), sum(t.bytes for t in cuts)) for (p, c), cuts in links.items()),
            output_stage=output_stage,
            prediction_bytes=prediction_bytes,
            split=split,
            shard_cuts=tuple(c.node for c in sharded),
            shard_bytes_per_row=sum(c.shard_bytes(split, mesh.sp) for c in sharded),
            unbatched=tuple(c.node for c in sent if c.batch_dim is None),
        )

    def with_mesh(self, mesh: Mesh) -> Layout:
        """The same stages on another mesh of as many positions (another batch, say)."""
        return replace(self, mesh=mesh)
