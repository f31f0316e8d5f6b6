"""Which ``dp x cfg x pp (x sp)`` meshes N devices allow, and parsing a user's ``--mesh``.

The compiler simulates every candidate for the requested batch and keeps the fastest
(``hybridiff.simulate``); this module only enumerates them. Every device is used when the
shape allows it: ``cfg = 1`` meshes fit any N, a ``cfg = 2`` mesh on an odd N leaves one
device idle (the plan says so and the CLI warns).
"""

from __future__ import annotations

import re
from typing import Callable

from hybridiff.errors import HybridiffError
from hybridiff.plan import Mesh


def candidate_meshes(gpus: int, guided: bool, batch: int = 1, splits: Callable[[int], bool] | None = None) -> list[Mesh]:
    """Every mesh worth simulating for ``gpus`` devices and ``batch`` images; with ``splits``
    (which ``sp`` the graph allows: ``TokenSplit.allows`` or ``PatchSplit.allows``), also each such ``sp`` dividing a
    branch group.

    More replicas than images would only idle, so ``dp <= batch``.
    """
    if gpus < 1:
        raise HybridiffError(f"--gpus {gpus}: need at least one device")
    meshes = []
    for cfg in (2, 1) if guided else (1,):
        used = gpus - gpus % cfg
        for dp in range(1, min(batch, used // cfg) + 1):
            if used % (dp * cfg) == 0:
                meshes.append(Mesh(world_size=gpus, dp=dp, cfg=cfg, pp=used // (dp * cfg), batch=batch))
    return meshes + [
        m.model_copy(update={"sp": sp})
        for m in meshes
        for sp in range(2, m.members + 1)
        if splits is not None and m.members % sp == 0 and splits(sp)
    ]


_MESH = re.compile(r"^\s*dp\s*=\s*(\d+)\s*,\s*cfg\s*=\s*(\d+)\s*,\s*pp\s*=\s*(\d+)\s*(?:,\s*sp\s*=\s*(\d+)\s*)?$")


def parse_mesh(text: str, gpus: int, guided: bool, batch: int = 1, splits: Callable[[int], bool] | None = None) -> Mesh:
    """``"dp=1,cfg=2,pp=2"`` (optionally ``,sp=S``) as a mesh for ``gpus`` devices, or a
    one-line error (``splits``: which ``sp`` the graph allows, if any)."""
    match = _MESH.match(text)
    if not match:
        raise HybridiffError(f"--mesh {text!r}: write it as dp=D,cfg=C,pp=P[,sp=S], e.g. dp=1,cfg=2,pp=2")
    dp, cfg, pp, sp = (int(g or 1) for g in match.groups())
    if cfg not in (1, 2) or dp < 1 or pp < 1:
        raise HybridiffError(f"--mesh {text!r}: cfg must be 1 or 2, dp and pp at least 1")
    if cfg == 2 and not guided:
        raise HybridiffError(f"--mesh {text!r}: cfg=2 splits the guidance branches; use cfg=1 or a guidance scale > 1")
    if dp * cfg * pp > gpus:
        raise HybridiffError(f"--mesh {text!r} needs {dp * cfg * pp} devices but --gpus is {gpus}; raise --gpus or shrink the mesh")
    members = pp if cfg == 2 else cfg * pp
    if sp > 1 and (splits is None or members % sp or not splits(sp)):
        why = "this model's graph has neither image tokens nor feature-map rows to split" if splits is None else (
            f"sp must divide the {members} devices of a branch group, and the image's tokens or rows "
            "(in bands of the UNet's downsampling) must split into sp"
        )
        raise HybridiffError(f"--mesh {text!r}: {why}")
    return Mesh(world_size=gpus, dp=dp, cfg=cfg, pp=pp, batch=batch, sp=sp)
