"""The execution plan, the contract between the compiler and the runtime (``contract``), and
what it is made of: the mesh, the graph's stages and cut tensors, the schedule and its phases,
the compiler's estimates. Everything is importable from ``hybridiff.plan``."""

from hybridiff.plan.contract import FORMAT_VERSION, Execution, Plan, imbalance, links_of, load_plan
from hybridiff.plan.estimates import Estimates, link_bytes_per_s
from hybridiff.plan.graph import CutTensor, GraphInfo, ModelRef, PatchSplit, Stage, TokenSplit, TokenTableRef
from hybridiff.plan.mesh import Branch, Mesh
from hybridiff.plan.schedule import RUN_PHASES, Phase, Schedule, StepCosts

__all__ = [
    "FORMAT_VERSION", "RUN_PHASES", "Branch", "CutTensor", "Estimates", "Execution", "GraphInfo", "Mesh", "ModelRef", "PatchSplit",
    "Phase", "Plan", "Schedule", "Stage", "StepCosts", "TokenSplit", "TokenTableRef", "imbalance", "link_bytes_per_s", "links_of",
    "load_plan",
]
