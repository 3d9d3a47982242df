"""Tier 1's ownership of its source partitions, as a sans-I/O state machine.

The consumer group decides who *reads* a partition; tier 1 also records who may *commit* it
(`io/partition_owners.py`, docs/ARCHITECTURE.md "One owner per source partition"). This module
holds every decision about that and does no I/O: the runtime (`tiers/coalesce.py`) feeds it
events (`handle`) and carries out the actions it returns, in order. An action that asks the
outside world something (claim, fence, hand over, read the committed offsets, ...) is answered by
an event naming that action; a failed one by `Failed`, after which nothing moves until the runtime
sends `Proceed` again (it waits a little first). Every action can be repeated.

The rules:

1. Every assigned partition is held (paused) until it is claimed under the current producer's
   transactional id, every id that held it before is fenced, its position is set to the committed
   offset and its deduplication ids are current. Only then is it read (`reading`).
2. A new producer for every assignment once the current one holds claims: the new owner of a
   partition this worker gives up fences the id this worker used, which must then hold no
   partition it keeps. The renewal fences this worker's old id itself, and that happens as soon
   as the revoked partitions' window is flushed, so the group's next owners of those partitions
   find the id already fenced (recorded in Redis) and skip it.
3. After an aborted transaction the producer is renewed and the partitions claimed under the old
   id are handed over to the new one by compare-and-set: those somebody claimed meanwhile are held,
   and their state dropped, until the group hands out partitions again.
4. After a claim and after an abort, the ids of a partition are read back from its changelog
   unless they end exactly at its committed offset (`ids_current`): a commit whose answer was lost
   moved the offset past what this worker saw commit.
5. An id that held a partition this worker claimed stays due for fencing until it is fenced,
   whatever happens to the assignment meanwhile: the owners hash already names this worker. (Redis
   keeps the ids too, until someone records them fenced, for claims whose answer was lost.)
6. No id is fenced twice by one worker: an id is dead for good once fenced after its producer
   started (this worker's own old ids, and ids a claim returned), so they are remembered, and
   recorded for the other workers (`RecordFenced`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Partitions = frozenset[int]

NO_OFFSET = -1  # no offset committed yet: read from the beginning
DEAD_IDS_KEPT = 1024  # ids remembered as fenced (a forgotten one only costs one more fence)


# --- actions: what the runtime carries out ---------------------------------------------------


@dataclass(frozen=True)
class Pause:
    partitions: Partitions


@dataclass(frozen=True)
class Resume:
    partitions: Partitions


@dataclass(frozen=True)
class DropIdsExcept:
    """Forget the dedup ids of every partition but these (a new assignment)."""

    partitions: Partitions


@dataclass(frozen=True)
class DropState:
    """Forget the open window and the dead letters of partitions, and their ids if `ids`."""

    partitions: Partitions
    ids: bool
    reason: str  # "claimed", "taken" (by another worker), "revoked" (flush failed)


@dataclass(frozen=True)
class Flush:
    """Commit the open window before these partitions are revoked. Answer: WindowFlushed/FlushFailed."""

    partitions: Partitions


@dataclass(frozen=True)
class RenewProducer:
    """Stop the producer, begin a new incarnation (fencing the previous id), start its producer.
    Answer: ProducerRenewed."""


@dataclass(frozen=True)
class Claim:
    """Record `producer_id` as the owner of the partitions. Answer: Claimed."""

    partitions: Partitions
    producer_id: str


@dataclass(frozen=True)
class Fence:
    """Fence these transactional ids (aborting what they left open). Answer: Fenced."""

    ids: frozenset[str]


@dataclass(frozen=True)
class RecordFenced:
    """Tell the other workers these ids are fenced for good (best effort, no answer)."""

    ids: frozenset[str]


@dataclass(frozen=True)
class HandOver:
    """Re-point the partitions still owned by `old_id` to `new_id`. Answer: HandedOver."""

    partitions: Partitions
    old_id: str
    new_id: str


@dataclass(frozen=True)
class FetchCommitted:
    """Read the group's committed offsets of the partitions. Answer: CommittedRead."""

    partitions: Partitions


@dataclass(frozen=True)
class Seek:
    """Set each partition's position (NO_OFFSET: the beginning). Answer: Sought."""

    offsets: Mapping[int, int]


@dataclass(frozen=True)
class RestoreIds:
    """Rebuild the dedup ids of the partitions from their changelog. Answer: IdsRestored."""

    offsets: Mapping[int, int]


Action = (
    Pause
    | Resume
    | DropIdsExcept
    | DropState
    | Flush
    | RenewProducer
    | Claim
    | Fence
    | RecordFenced
    | HandOver
    | FetchCommitted
    | Seek
    | RestoreIds
)
Asking = RenewProducer | Claim | Fence | HandOver | FetchCommitted | Seek | RestoreIds


# --- events: what happened -------------------------------------------------------------------


@dataclass(frozen=True)
class Assigned:
    """The group handed out partitions (a new generation). Answered with local actions only."""

    partitions: Partitions


@dataclass(frozen=True)
class Revoked:
    partitions: Partitions


@dataclass(frozen=True)
class WindowFlushed:
    partitions: Partitions


@dataclass(frozen=True)
class FlushFailed:
    partitions: Partitions


@dataclass(frozen=True)
class Proceed:
    """The runtime is ready to carry out pending work (again, after a failure)."""


@dataclass(frozen=True)
class ProducerRenewed:
    """A producer runs under `producer_id`; starting it fenced `fenced` (the previous start's id)."""

    producer_id: str
    fenced: str | None = None


@dataclass(frozen=True)
class Claimed:
    claim: Claim
    previous: frozenset[str]  # the ids that held the partitions before


@dataclass(frozen=True)
class Fenced:
    fence: Fence
    done: frozenset[str]  # the ids fenced now; the others failed


@dataclass(frozen=True)
class HandedOver:
    hand_over: HandOver
    kept: Partitions


@dataclass(frozen=True)
class CommittedRead:
    fetch: FetchCommitted
    offsets: Mapping[int, int]  # NO_OFFSET: none committed


@dataclass(frozen=True)
class Sought:
    seek: Seek


@dataclass(frozen=True)
class IdsRestored:
    restore: RestoreIds


@dataclass(frozen=True)
class Aborted:
    """The window's transaction aborted: nothing of it is visible."""


@dataclass(frozen=True)
class Failed:
    action: Action
    error: str = ""


Event = (
    Assigned
    | Revoked
    | WindowFlushed
    | FlushFailed
    | Proceed
    | ProducerRenewed
    | Claimed
    | Fenced
    | HandedOver
    | CommittedRead
    | Sought
    | IdsRestored
    | Aborted
    | Failed
)


@dataclass
class _Rewind:
    """Partitions claimed and fenced (or kept after an abort), on their way to being read."""

    partitions: set[int] = field(default_factory=set)
    offsets: dict[int, int] | None = None  # committed offsets, once read
    sought: bool = False
    restored: bool = False

    def reset(self) -> None:
        self.offsets, self.sought, self.restored = None, False, False


class Ownership:
    """Which source partitions this worker may read, and what to do to read more of them.

    `ids_current(partition, committed_offset)`: does the dedup state this worker holds end exactly
    at that offset (`Coalescer.ids_current`)? None when the topology keeps no ids.
    """

    def __init__(self, ids_current: Callable[[int, int], bool] | None = None) -> None:
        self._ids_current = ids_current
        self.producer_id = ""
        self.assigned: Partitions = frozenset()
        self.reading: set[int] = set()
        self.claiming: set[int] = set()  # to claim (and fence their previous holders)
        self.unfenced: set[str] = set()  # ids that held partitions this worker claimed
        self._rewind = _Rewind()
        self._claim_answered = False  # `claiming` is claimed under the current producer
        self._producer_claims: set[int] = set()  # partitions the current producer may own in Redis
        self._renew = True  # no producer yet
        self._hand_over: tuple[set[int], str] | None = None  # partitions, old id: after an abort
        self._revoking: Partitions = frozenset()
        self._in_flight: Asking | None = None
        self._stalled = False
        self._dead: dict[str, None] = {}  # ids fenced for good, oldest first

    # --- views ---

    @property
    def held(self) -> Partitions:
        """Assigned partitions not read: being claimed or rewound, or claimed by another worker."""
        return self.assigned - self.reading

    @property
    def rewinding(self) -> Partitions:
        return frozenset(self._rewind.partitions)

    @property
    def pending(self) -> bool:
        """Is there work for `Proceed`?"""
        return bool(
            self._renew or self._hand_over or self.claiming or self._rewind.partitions or self.unfenced
        )

    @property
    def producer_claims(self) -> Partitions:
        return frozenset(self._producer_claims)

    def known_fenced(self, transactional_id: str) -> bool:
        return transactional_id in self._dead

    # --- events ---

    def handle(self, event: Event) -> list[Action]:
        match event:
            case Assigned(partitions):
                return self._assigned(partitions)
            case Revoked(partitions):
                if not partitions:
                    return []
                self._revoking = frozenset(partitions)
                return [Flush(frozenset(partitions))]
            case WindowFlushed(partitions):
                self._forget(partitions)
                # renew now, not at the next assignment: the id is fenced before the partitions'
                # next owners claim them, so they need not fence it too
                return self._next()
            case FlushFailed(partitions):
                self._forget(partitions)
                return [DropState(frozenset(partitions), ids=True, reason="revoked"), *self._next()]
            case Proceed():
                self._stalled = False
                return self._next()
            case ProducerRenewed(producer_id, fenced):
                return self._renewed(producer_id, fenced)
            case Claimed(claim, previous):
                return self._claimed(claim, previous)
            case Fenced(fence, done):
                return self._fenced(fence, done)
            case HandedOver(hand_over, kept):
                return self._handed_over(hand_over, kept)
            case CommittedRead(fetch, offsets):
                if self._answers(fetch):
                    if set(offsets) != fetch.partitions:  # never guess an offset: read them again
                        self._stalled = True
                        return []
                    self._rewind.offsets = dict(offsets)
                return self._next()
            case Sought(seek):
                if self._answers(seek):
                    self._rewind.sought = True
                return self._next()
            case IdsRestored(restore):
                if self._answers(restore):
                    self._rewind.restored = True
                return self._next()
            case Aborted():
                return self._aborted()
            case Failed(action):
                if action == self._in_flight:
                    self._in_flight = None
                self._stalled = True
                return []
        raise TypeError(f"not an ownership event: {event!r}")

    def _assigned(self, partitions: Iterable[int]) -> list[Action]:
        self.assigned = frozenset(partitions)
        self.reading.clear()
        self.claiming = set(self.assigned)
        self._claim_answered = False
        self._rewind = _Rewind()
        self._hand_over = None  # every partition is claimed afresh
        self._revoking = frozenset()
        self._in_flight = None  # an answer still on its way is stale
        self._stalled = False
        if self._producer_claims:
            self._renew = True  # rule 2
        return [Pause(self.assigned), DropIdsExcept(self.assigned)]

    def _forget(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        self.assigned -= gone
        self.reading -= gone
        self.claiming -= gone
        if self._rewind.partitions & gone:
            self._rewind.partitions -= gone
            if self._rewind.offsets is not None:
                self._rewind.offsets = {p: o for p, o in self._rewind.offsets.items() if p not in gone}
        if self._hand_over is not None:
            self._hand_over[0].difference_update(gone)
        self._revoking -= gone
        if self._producer_claims and not (self.reading or self._rewind.partitions):
            # rule 2: the partitions' next owner fences this producer's id, which must then hold
            # nothing this worker reads (a claim still to make is made under the new id)
            self._renew = True

    def _renewed(self, producer_id: str, fenced: str | None) -> list[Action]:
        out: list[Action] = []
        if fenced and fenced == self.producer_id:
            # this worker's own previous producer, started before the fence: dead for good
            self._mark_dead([fenced])
            self.unfenced.discard(fenced)
            out.append(RecordFenced(frozenset([fenced])))
        elif self.producer_id and self.producer_id not in self._dead:
            # the renewal fenced another id (a start that failed after recording its id): the old
            # producer is fenced before anything it held is read again
            self.unfenced.add(self.producer_id)
        self.producer_id = producer_id
        self._producer_claims = set()
        self._renew = False
        self._claim_answered = False  # claims made under the old id count for nothing now
        if isinstance(self._in_flight, RenewProducer):
            self._in_flight = None
        return out + self._next()

    def _claimed(self, claim: Claim, previous: Iterable[str]) -> list[Action]:
        # whatever the claim was for, it displaced these ids: they must be fenced (rule 5)
        self.unfenced.update(i for i in previous if i != self.producer_id and i not in self._dead)
        current = claim.partitions == self.claiming and claim.producer_id == self.producer_id
        if self._answers(claim) and current:
            self._claim_answered = True
        return self._next()

    def _fenced(self, fence: Fence, done: Iterable[str]) -> list[Action]:
        done = frozenset(done)
        self.unfenced -= done
        self._mark_dead(done)
        out: list[Action] = [RecordFenced(done)] if done else []
        if self._answers(fence) and fence.ids - done:
            self._stalled = True  # retried on the next Proceed
            return out
        return out + self._next()

    def _handed_over(self, hand_over: HandOver, kept: Iterable[int]) -> list[Action]:
        if not self._answers(hand_over) or self._hand_over is None:
            return self._next()
        return self._keep(frozenset(kept) & hand_over.partitions, hand_over.partitions)

    def _keep(self, kept: Partitions, asked: Partitions) -> list[Action]:
        """The hand-over after an abort is done: the new producer owns `kept` of `asked`."""
        self._hand_over = None
        self._producer_claims -= asked - kept
        lost = frozenset(self._rewind.partitions - kept)
        out: list[Action] = []
        if lost:
            # claimed by another worker since: held until the group hands out partitions again
            self._rewind.partitions -= lost
            out.append(DropState(lost, ids=True, reason="taken"))
        return out + self._next()

    def _aborted(self) -> list[Action]:
        paused = frozenset(self.reading)
        if self._hand_over is None:
            # what the old id was read (or about to be read) under; a claim still to finish is
            # simply made again under the new id (Redis keeps what the first one displaced)
            keep = (self.reading | self._rewind.partitions) - self._revoking
            self._hand_over = (set(keep), self.producer_id)
        # every partition read so far goes back to its committed offset before it is read again
        # (those being revoked are simply left to their next owner)
        self._rewind.partitions |= self.reading - self._revoking
        self._rewind.reset()
        self.reading.clear()
        self._renew = True
        self._claim_answered = False
        self._stalled = False
        return ([Pause(paused)] if paused else []) + self._next()

    # --- the next step ---

    def _answers(self, action: Asking) -> bool:
        """Is `action` the one in flight? Clears it if so (else its answer is stale)."""
        if action != self._in_flight:
            return False
        self._in_flight = None
        return True

    def _ask(self, action: Asking) -> list[Action]:
        self._in_flight = action
        return [action]

    def _next(self) -> list[Action]:
        if self._stalled or self._in_flight is not None:
            return []
        if self._renew:
            return self._ask(RenewProducer())
        if self._hand_over is not None:
            partitions, old_id = self._hand_over
            if not partitions:
                return self._keep(frozenset(), frozenset())
            self._producer_claims |= partitions
            return self._ask(HandOver(frozenset(partitions), old_id, self.producer_id))
        if self.claiming and not self._claim_answered:
            self._producer_claims |= self.claiming
            return self._ask(Claim(frozenset(self.claiming), self.producer_id))
        if self.unfenced:
            return self._ask(Fence(frozenset(self.unfenced)))
        out: list[Action] = []
        if self.claiming:
            claimed = frozenset(self.claiming)
            self.claiming.clear()
            self._claim_answered = False
            self._rewind.partitions |= claimed
            self._rewind.reset()
            out.append(DropState(claimed, ids=False, reason="claimed"))
        rewind = self._rewind
        if not rewind.partitions:
            return out
        if rewind.offsets is None:
            return out + self._ask(FetchCommitted(frozenset(rewind.partitions)))
        if not rewind.sought:
            return out + self._ask(Seek(dict(rewind.offsets)))
        if not rewind.restored:
            stale = self._stale(rewind.offsets)
            if stale:
                return out + self._ask(RestoreIds(stale))
            rewind.restored = True
        ready = frozenset(rewind.partitions)
        self.reading |= ready
        self._rewind = _Rewind()
        return [*out, Resume(ready)]

    def _stale(self, offsets: Mapping[int, int]) -> dict[int, int]:
        if self._ids_current is None:
            return {}
        return {p: o for p, o in sorted(offsets.items()) if not self._ids_current(p, o)}

    def _mark_dead(self, ids: Iterable[str]) -> None:
        for i in ids:
            self._dead.pop(i, None)
            self._dead[i] = None
        while len(self._dead) > DEAD_IDS_KEPT:
            del self._dead[next(iter(self._dead))]
