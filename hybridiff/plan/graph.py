"""What a plan says about the model and its traced graph: where it came from, how its tokens
or feature-map rows can be split, the stages and the tensors that cross them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hybridiff.plan.strict import Strict


class ModelRef(Strict):
    """What the plan was compiled from: ``builtin:NAME``, a local diffusers folder,
    ``arch:NAME`` (a published architecture, no weights) or ``python:CLASS`` (the Python API)."""

    source: str
    denoiser: Literal["unet", "sd3-transformer", "flux", "qwen-image", "sana", "wan", "custom"] = "unet"
    #: Pixels; latents are 1/8 of the image, so both are multiples of 8.
    height: int | None = Field(default=None, gt=0, multiple_of=8, description="image height in pixels the plan was costed for")
    width: int | None = Field(default=None, gt=0, multiple_of=8)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: Extra arguments of every pipeline call, from the model's card (e.g. SD3's
    #: ``max_sequence_length``): they fix input shapes the plan was costed for.
    pipeline_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    #: How guidance calls the denoiser: one call per step on ``[uncond; cond]`` rows (SD, SDXL,
    #: SD3), or one call per branch, conditional first (Flux, Wan true CFG). The serial baseline
    #: costs differently, and a loop calling otherwise is refused.
    guidance_calls: Literal["batched", "two-calls"] = "batched"


class TokenTableRef(Strict):
    """A value indexed by image token besides the tokens (a rotary table): each shard peer
    keeps its rows of it, after the text's rows where the value holds both."""

    node: str
    dim: int = Field(description="the dimension that runs over tokens")
    element: int | None = Field(default=None, description="the element of a tuple value indexed per token (None: every element)")


class TokenSplit(Strict):
    """Where a transformer denoiser's image tokens form one sequence that only attention mixes:
    sequence parallelism (``Mesh.sp``) cuts it after ``shard_after`` (and every table) and
    joins it after ``gather_after`` (``runtime.sequence``)."""

    shard_after: str = Field(description="the node giving the image tokens [rows, tokens, dim] (patch embedding)")
    gather_after: str = Field(description="the last per-token node before the tokens are unpatchified")
    tokens: int = Field(gt=0, description="image tokens per row")
    text_tokens: int = Field(default=0, ge=0, description="text tokens per row in the image's sequence, which every peer computes whole")
    attentions: int = Field(ge=1, description="attention layers over the image tokens in one forward")
    kv_bytes_per_row: int = Field(ge=0, description="bytes of the image tokens' keys and values, one row, all attentions")
    tables: list[TokenTableRef] = Field(default_factory=list, description="values indexed per image token (rotary tables)")
    text_first: bool = Field(default=False, description="joint text+image sequences hold the text first (Flux, Qwen-Image)")
    cross_keys: int = Field(
        default=0, ge=0, description="keys of the attentions from the image tokens to the text only (no exchange); 0: none"
    )

    def allows(self, sp: int) -> bool:
        """Whole shares, and (with cross-attention) a share unlike the text's length: an
        attention whose queries and keys are equally long is the one that gathers."""
        return self.tokens % sp == 0 and self.tokens // sp != self.cross_keys

    def image_start(self, length: int, images: int) -> int:
        """Where ``images`` image tokens start in a sequence of ``length`` holding them and every
        text token: after the text when it comes first, else at 0."""
        return length - images if self.text_first else 0

    def share(self, size: int, sp: int) -> int:
        """How much of a sequence of ``size`` (the image tokens and any text tokens) one of
        ``sp`` shard peers holds: its own image tokens and every text token."""
        return size - self.tokens + self.tokens // sp

    @staticmethod
    def exact(full_steps_done: int, step: int, tau2: int | None) -> bool:
        """Token splits are exact on every step."""
        return True


class PatchSplit(Strict):
    """What a UNet's feature maps exchange when ``Mesh.sp`` shard peers each run a band of the
    latent's rows (displaced patch parallelism, ``runtime.patches``), per row of one forward."""

    latent: str = Field(description="the graph input holding the latent, split into row bands")
    height: int = Field(gt=0, description="latent rows")
    factor: int = Field(ge=1, description="every band holds a multiple of this many rows (the UNet's downsampling)")
    halo_bytes_per_row: int = Field(ge=0, description="rows convolutions read from neighbour bands")
    kv_bytes_per_row: int = Field(ge=0, description="self-attention keys and values")
    stats_bytes_per_row: int = Field(ge=0, description="group-norm statistics")
    exchanges: int = Field(ge=1, description="operations that read across bands in one forward")
    #: Full steps at the start of each call computed exactly (peers' values of the same step);
    #: the first full step after the window is exact too.
    exact_steps: int = Field(default=4, ge=1)

    def allows(self, sp: int) -> bool:
        return self.height % sp == 0 and (self.height // sp) % self.factor == 0

    @staticmethod
    def share(size: int, sp: int) -> int:
        """How many of a feature map's ``size`` rows (or tokens) one of ``sp`` bands holds."""
        return size // sp

    def exact(self, full_steps_done: int, step: int, tau2: int | None) -> bool:
        """Whether full step ``step`` exchanges this step's values between bands: the first
        ``exact_steps`` full steps of a call, and the first full step after the window (the
        peers' last values are several steps old there). The runtime and the simulator ask here."""
        return full_steps_done < self.exact_steps or (tau2 is not None and step == tau2 + 1)


class GraphInfo(Strict):
    fingerprint: str = Field(min_length=1)
    num_nodes: int = Field(gt=0)
    latent: str = Field(default="sample", description="the graph input carrying the noisy latent")
    #: Blocks opened into their children after tracing, in order (see compiler.refine): the
    #: runtime applies the same list to reproduce this graph.
    refined: list[str] = Field(default_factory=list)
    #: Nodes that do not depend on the latent (time and added-condition embeddings): every
    #: rank recomputes them each step from its own inputs, so they are never stale.
    replicated: list[str]
    #: Set for transformer denoisers whose tokens can be split (``Mesh.sp``); None otherwise.
    tokens: TokenSplit | None = None
    #: Set for UNets whose feature maps can be split into row bands (``Mesh.sp``); None otherwise.
    patches: PatchSplit | None = None

    @property
    def shard_split(self) -> TokenSplit | PatchSplit | None:
        """How shard peers (``Mesh.sp``) split this graph's rows: tokens, bands, or not at all."""
        return self.tokens if self.tokens is not None else self.patches


class Stage(Strict):
    index: int = Field(ge=0, description="stage s runs on position s of every replica")
    nodes: list[str] = Field(min_length=1, description="heavy nodes, in topological order")
    recompute: list[str] = Field(description="replicated nodes this stage recomputes each step")
    cost_s: float = Field(ge=0, description="compute of nodes and recomputed embeddings, one row, seconds")
    send_bytes: int = Field(ge=0, description="cut tensor bytes this stage sends per window step and row")


class CutTensor(Strict):
    """A value produced in one stage and consumed by others: sent one step stale.

    ``shape`` and ``bytes`` are for one row (one image of one branch); ``batch_dim`` is the
    dimension that grows with the rows a stage runs. Shape arithmetic crossing a cut
    (``constant`` set) is static for the plan's image size: consumers compute it from here
    (``constant + (rows - 1) * constant_per_row``) and nothing is sent.
    """

    node: str
    producer: int = Field(ge=0, description="producing stage index")
    consumers: list[int] = Field(min_length=1)
    shape: list[int]
    dtype: str
    bytes: int = Field(ge=0)
    batch_dim: int | None = 0
    constant: int | float | list[int] | None = None
    constant_per_row: int | float | list[int] | None = None
    #: With ``Mesh.sp > 1``: the dimension along which each shard peer holds only its share
    #: (``TokenSplit.share``/``PatchSplit.share``) after a full step, so the tau1 hand-off
    #: gathers it whole first; None: every peer computes it whole.
    shard_dim: int | None = None

    def runtime_value(self, rows: int = 1) -> int | float | tuple[int, ...] | None:
        value, step = self.constant, self.constant_per_row
        if isinstance(value, list):
            steps = step if isinstance(step, list) else [0] * len(value)
            return tuple(v + (rows - 1) * d for v, d in zip(value, steps))
        return value if value is None or step is None else value + (rows - 1) * step

    def row_shape(self, rows: int) -> list[int]:
        """The tensor's shape when its stage runs ``rows`` rows."""
        shape = list(self.shape)
        if self.batch_dim is not None:
            shape[self.batch_dim] *= rows
        return shape

    def shard_shape(self, rows: int, split: TokenSplit | PatchSplit, sp: int) -> list[int]:
        """The shape one of ``sp`` shard peers holds for ``rows`` rows (``row_shape`` if whole)."""
        shape = self.row_shape(rows)
        if self.shard_dim is not None:
            shape[self.shard_dim] = split.share(shape[self.shard_dim], sp)
        return shape

    def shard_bytes(self, split: TokenSplit | PatchSplit, sp: int) -> int:
        """Bytes of one row's share on one of ``sp`` shard peers."""
        if self.shard_dim is None:
            return self.bytes
        size = self.shape[self.shard_dim]
        return self.bytes * split.share(size, sp) // size
