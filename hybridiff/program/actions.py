"""The actions a step program is made of, and the program itself.

A step program lists, in order, what the positions of one replica do in one step (or in the
tau1 hand-off): run the whole graph or one stage on some rows, post and take cut tensors,
exchange predictions, join shards. The runtime executes each action
(``runtime.execution.executor``), the simulator costs it (``hybridiff.simulate``) and
``hybridiff simulate --program`` prints it, so all three see one schedule.

An action names the positions that take part (``positions``). A point-to-point action is
done by one of them (a post by its sender, a take by its receiver); a collective by every one
of them together. Filtering a program by position gives that rank's own ordered list, which
is what a worker executes; the emulation, hosting every rank, executes the whole list in order.
``bytes`` is what the action's senders put on the wire, counted once per receiver, as the
transports count it: the run's bytes per phase are the programs' by construction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hybridiff.plan import Phase


def _rows(rows: range) -> str:
    return f"rows {rows.start}:{rows.stop}"


def _cuts(cuts: tuple[str, ...]) -> str:
    return f"{len(cuts)} cut tensor(s)"


@dataclass(frozen=True, kw_only=True)
class Action:
    phase: Phase
    bytes: int = 0

    @property
    def positions(self) -> tuple[int, ...]:
        """The positions taking part: the one doing it, or every member of a collective."""
        raise TypeError(f"{type(self).__name__} does not say who takes part")  # every kind below does

    def describe(self) -> str:
        """One line for people (``hybridiff simulate --program``)."""
        raise TypeError(f"{type(self).__name__} cannot describe itself")


@dataclass(frozen=True, kw_only=True)
class Forward(Action):
    """The whole graph on ``rows``, keeping the cut tensors (a full step). ``check``: compare
    the cut tensors with the plan's shapes first (a call's first step)."""

    position: int
    rows: range
    check: bool = False

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,)

    def describe(self) -> str:
        return f"forward {_rows(self.rows)}" + (", check cut shapes" if self.check else "")


@dataclass(frozen=True, kw_only=True)
class ShardForward(Action):
    """The whole graph on ``rows``, each of ``peers`` on its share of every row (``Mesh.sp``),
    exchanging what crosses shards: this step's values (``exact``) or the last full step's."""

    peers: tuple[int, ...]
    rows: range
    exact: bool
    check: bool = False

    @property
    def positions(self) -> tuple[int, ...]:
        return self.peers

    def describe(self) -> str:
        how = "exact" if self.exact else "one step stale"
        return f"shard forward {_rows(self.rows)} with peers {list(self.peers)} ({how}, {self.bytes} B)"


@dataclass(frozen=True, kw_only=True)
class ExchangePredictions(Action):
    """Every member's predictions to every member, in member order (``sizes``: rows each gives)."""

    members: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return self.members

    def describe(self) -> str:
        return f"exchange predictions, rows per member {list(self.sizes)} ({self.bytes} B)"


@dataclass(frozen=True, kw_only=True)
class JoinShards(Action):
    """Before the hand-off: the shard peers of ``rows`` gather their shares of ``cuts`` for
    the first of them, who then holds them whole."""

    peers: tuple[int, ...]
    rows: range
    cuts: tuple[str, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return self.peers

    def describe(self) -> str:
        return f"join shards of {_cuts(self.cuts)}, {_rows(self.rows)}, for position {self.peers[0]} ({self.bytes} B)"


@dataclass(frozen=True, kw_only=True)
class Expect(Action):
    """Post the receive of a message a later ``Take`` reads, so it can arrive early."""

    src: int
    dst: int
    cuts: tuple[str, ...]
    rows: int

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.dst,)

    def describe(self) -> str:
        return f"expect {_cuts(self.cuts)} from position {self.src} ({self.rows} row(s))"


@dataclass(frozen=True, kw_only=True)
class Post(Action):
    """Send ``cuts`` for ``rows`` rows to ``dst``: the stage's values of this step, or rows
    ``part`` of the position's last full forward (the hand-off)."""

    src: int
    dst: int
    cuts: tuple[str, ...]
    rows: int
    part: range | None = None

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.src,)

    def describe(self) -> str:
        source = "this stage's" if self.part is None else f"the full forward's {_rows(self.part)} of"
        return f"post {source} {_cuts(self.cuts)} to position {self.dst} ({self.rows} row(s), {self.bytes} B)"


@dataclass(frozen=True, kw_only=True)
class Take(Action):
    """Receive the oldest message on a link from each source (``(position, rows)``), joined
    along the cut tensors' batch dimension."""

    dst: int
    sources: tuple[tuple[int, int], ...]
    cuts: tuple[str, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.dst,)

    def describe(self) -> str:
        return f"take {_cuts(self.cuts)} from " + ", ".join(f"position {s} ({n} row(s))" for s, n in self.sources)


@dataclass(frozen=True, kw_only=True)
class RunStage(Action):
    """The position's own stage on ``rows``: the fresh inputs and the cut tensors taken."""

    position: int
    rows: range

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,)

    def describe(self) -> str:
        return f"run stage {self.position} on {_rows(self.rows)}"


@dataclass(frozen=True, kw_only=True)
class BroadcastOutput(Action):
    """The output stage's prediction (``rows`` rows) to every member."""

    src: int
    members: tuple[int, ...]
    rows: int

    @property
    def positions(self) -> tuple[int, ...]:
        return self.members

    def describe(self) -> str:
        return f"broadcast the output of position {self.src} ({self.rows} row(s), {self.bytes} B)"


@dataclass(frozen=True, kw_only=True)
class Flush(Action):
    """Finish the sends posted so far while the step's output is awaited anyway."""

    members: tuple[int, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return self.members

    def describe(self) -> str:
        return "finish sends"


@dataclass(frozen=True)
class StepProgram:
    """What one replica does in a step (or the hand-off), in order.

    ``returns``: what the step gives the pipeline: ``"predictions"`` (every row, gathered),
    ``"mixed"`` (the window's one prediction as both guidance halves), ``"cached"`` (the same
    with tau1's guidance direction added back), ``"prediction"`` (the whole batch, cfg = 1);
    None for the hand-off, which returns nothing."""

    kind: str
    actions: tuple[Action, ...]
    returns: str | None = None
    #: What the program was built for, for people: rows, first/last window step, exactness.
    about: dict[str, object] = field(default_factory=dict, compare=False)

    def bytes_by_phase(self) -> Counter[Phase]:
        counts: Counter[Phase] = Counter()
        for action in self.actions:
            counts[action.phase] += action.bytes
        return counts
