"""Tier 1's ownership state machine (pipeline/core/ownership.py): every transition, then a model of
Redis, Kafka and rival workers driven by random event sequences, with failures and lost answers.

The model's central check is the one the machine exists for: whenever this worker commits a window,
the owners hash names its producer for every partition it reads (so any rival that took one has
fenced it, and the commit would have failed instead).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import ownership as own
from pipeline.core.ownership import (
    NO_OFFSET,
    Aborted,
    Assigned,
    Claim,
    Claimed,
    CommittedRead,
    DropIdsExcept,
    DropState,
    Failed,
    Fence,
    Fenced,
    FetchCommitted,
    Flush,
    FlushFailed,
    HandedOver,
    HandOver,
    IdsRestored,
    Ownership,
    Pause,
    Proceed,
    ProducerRenewed,
    RecordFenced,
    RenewProducer,
    RestoreIds,
    Resume,
    Revoked,
    Seek,
    Sought,
    WindowFlushed,
)

P = frozenset


def started(ids_current: Any = None, producer: str = "w1") -> Ownership:
    m = Ownership(ids_current)
    assert m.pending and m.handle(Proceed()) == [RenewProducer()]
    assert m.handle(ProducerRenewed(producer, None)) == []
    assert not m.pending
    return m


def claim_all(m: Ownership, offsets: dict[int, int], previous: frozenset[str] = P()) -> list[own.Action]:
    """Drive a claim whose steps all succeed; returns every action after the first Proceed."""
    seen: list[own.Action] = []
    actions = m.handle(Proceed())
    while actions:
        seen += actions
        last = actions[-1]
        match last:
            case RenewProducer():
                n = int(m.producer_id[1:]) + 1
                actions = m.handle(ProducerRenewed(f"w{n}", m.producer_id))
            case Claim():
                actions = m.handle(Claimed(last, previous))
            case Fence(ids):
                actions = m.handle(Fenced(last, ids))
            case FetchCommitted(partitions):
                actions = m.handle(CommittedRead(last, {p: offsets[p] for p in partitions}))
            case Seek():
                actions = m.handle(Sought(last))
            case RestoreIds():
                actions = m.handle(IdsRestored(last))
            case HandOver(partitions):
                actions = m.handle(HandedOver(last, partitions))
            case _:
                actions = []
    return seen


# --- one transition at a time --------------------------------------------------------------------


def test_a_new_machine_first_starts_a_producer() -> None:
    m = Ownership()
    assert m.pending and m.producer_id == ""
    assert m.handle(Proceed()) == [RenewProducer()]
    assert m.handle(ProducerRenewed("w1", "w0")) == []  # a previous start's id: not this worker's own
    assert m.producer_id == "w1" and not m.pending and not m.known_fenced("w0")


def test_proceed_with_nothing_to_do_does_nothing() -> None:
    assert started().handle(Proceed()) == []


def test_an_assignment_holds_every_partition_and_drops_other_ids() -> None:
    m = started()
    assert m.handle(Assigned(P({0, 1}))) == [Pause(P({0, 1})), DropIdsExcept(P({0, 1}))]
    assert m.held == {0, 1} and m.claiming == {0, 1} and m.pending and not m.reading


def test_a_claim_fences_the_previous_holders_then_rewinds_and_reads() -> None:
    m = started(ids_current=lambda p, offset: p == 0 and offset == 5)
    m.handle(Assigned(P({0, 1})))
    [claim] = m.handle(Proceed())
    assert claim == Claim(P({0, 1}), "w1")  # a fresh producer claims at once
    [fence] = m.handle(Claimed(claim, P({"x1", "y1"})))
    assert fence == Fence(P({"x1", "y1"}))
    after_fence = m.handle(Fenced(fence, P({"x1", "y1"})))
    fetch = FetchCommitted(P({0, 1}))
    assert after_fence == [
        RecordFenced(P({"x1", "y1"})),
        DropState(P({0, 1}), ids=False, reason="claimed"),
        fetch,
    ]
    assert m.held == {0, 1}  # still not read
    [seek] = m.handle(CommittedRead(fetch, {0: 5, 1: NO_OFFSET}))
    assert seek == Seek({0: 5, 1: NO_OFFSET})
    [restore] = m.handle(Sought(seek))
    assert restore == RestoreIds({1: NO_OFFSET})  # partition 0's ids end at its committed offset
    assert m.handle(IdsRestored(restore)) == [Resume(P({0, 1}))]
    assert m.reading == {0, 1} and not m.held and not m.pending
    assert m.known_fenced("x1") and m.known_fenced("y1")


def test_no_fence_without_previous_holders_and_no_restore_without_ids() -> None:
    m = started(ids_current=None)
    m.handle(Assigned(P({3})))
    seen = claim_all(m, {3: 7})
    assert not [a for a in seen if isinstance(a, Fence | RestoreIds)]
    assert Seek({3: 7}) in seen and seen[-1] == Resume(P({3}))


def test_every_partition_current_needs_no_restore() -> None:
    m = started(ids_current=lambda p, offset: True)
    m.handle(Assigned(P({0})))
    seen = claim_all(m, {0: 4})
    assert not [a for a in seen if isinstance(a, RestoreIds)]


def test_a_new_assignment_gets_a_new_producer_once_the_current_one_holds_claims() -> None:
    m = started()
    m.handle(Assigned(P({0, 1})))
    claim_all(m, {0: 1, 1: 1})
    m.handle(Assigned(P({1, 2})))
    assert m.handle(Proceed()) == [RenewProducer()]
    # the renewal fenced this worker's own previous id: recorded, and never fenced again
    assert m.handle(ProducerRenewed("w2", "w1")) == [RecordFenced(P({"w1"})), Claim(P({1, 2}), "w2")]
    assert m.known_fenced("w1")


def test_a_claim_returning_an_id_already_fenced_fences_nothing() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    claim_all(m, {0: 1})
    m.handle(Assigned(P({0})))
    m.handle(Proceed())
    [claim] = m.handle(ProducerRenewed("w2", "w1"))[1:]
    after = m.handle(Claimed(claim, P({"w1"})))
    assert not [a for a in after if isinstance(a, Fence)]  # fenced by the renewal, not twice
    assert after[-1] == FetchCommitted(P({0}))


def test_a_renewal_that_fenced_another_id_does_not_count_as_fencing_this_one() -> None:
    # a renewal whose Redis write landed but whose start failed: the next one fences that id, not ours
    m = started()
    m.handle(Assigned(P({0})))
    claim_all(m, {0: 1})
    m.handle(Assigned(P({0})))
    m.handle(Proceed())
    [claim] = m.handle(ProducerRenewed("w3", "w2"))
    assert not m.known_fenced("w1") and m.unfenced == {"w1"}  # fenced before anything is read
    assert m.handle(Claimed(claim, P({"w1"}))) == [Fence(P({"w1"}))]


def test_revocation_flushes_first_and_renews_before_the_next_owners_claim() -> None:
    m = started()
    m.handle(Assigned(P({0, 1})))
    claim_all(m, {0: 1, 1: 1})
    assert m.handle(Revoked(P({0, 1}))) == [Flush(P({0, 1}))]
    assert m.handle(WindowFlushed(P({0, 1}))) == [RenewProducer()]
    assert not m.assigned and not m.reading
    assert m.handle(ProducerRenewed("w2", "w1")) == [RecordFenced(P({"w1"}))]
    m.handle(Assigned(P({1})))
    assert m.handle(Proceed()) == [Claim(P({1}), "w2")]  # renewed already: claimed at once


def test_revoking_nothing_does_nothing() -> None:
    assert started().handle(Revoked(P())) == []


def test_a_failed_flush_before_revocation_drops_the_partitions_state() -> None:
    m = started()
    m.handle(Assigned(P({0, 1})))
    claim_all(m, {0: 1, 1: 1})
    m.handle(Revoked(P({0, 1})))
    assert m.handle(FlushFailed(P({0, 1}))) == [
        DropState(P({0, 1}), ids=True, reason="revoked"),
        RenewProducer(),
    ]


def test_an_abort_renews_and_keeps_only_what_nobody_claimed_since() -> None:
    m = started(ids_current=lambda p, offset: offset == 1)
    m.handle(Assigned(P({0, 1})))
    claim_all(m, {0: 1, 1: 1})
    assert m.handle(Aborted()) == [Pause(P({0, 1})), RenewProducer()]
    assert m.held == {0, 1} and m.rewinding == {0, 1}
    renewed = m.handle(ProducerRenewed("w2", "w1"))
    hand_over = HandOver(P({0, 1}), "w1", "w2")
    assert renewed == [RecordFenced(P({"w1"})), hand_over]
    fetch = FetchCommitted(P({0}))
    assert m.handle(HandedOver(hand_over, P({0}))) == [DropState(P({1}), ids=True, reason="taken"), fetch]
    # a commit whose answer was lost moved partition 0 past what this worker saw commit
    [seek] = m.handle(CommittedRead(fetch, {0: 2}))
    [restore] = m.handle(Sought(seek))
    assert restore == RestoreIds({0: 2})
    assert m.handle(IdsRestored(restore)) == [Resume(P({0}))]
    assert m.reading == {0} and m.held == {1} and not m.pending  # 1 held until the next assignment
    m.handle(Assigned(P({0, 1})))
    assert m.handle(Proceed()) == [RenewProducer()]  # the hand-over gave w2 claims


def test_an_abort_with_everything_taken_needs_no_new_producer_next_time() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    claim_all(m, {0: 1})
    m.handle(Aborted())
    [_, hand_over] = m.handle(ProducerRenewed("w2", "w1"))
    assert m.handle(HandedOver(hand_over, P())) == [DropState(P({0}), ids=True, reason="taken")]
    assert not m.producer_claims
    m.handle(Assigned(P({0})))
    assert m.handle(Proceed()) == [Claim(P({0}), "w2")]


def test_an_abort_during_revocation_hands_nothing_over() -> None:
    m = started()
    m.handle(Assigned(P({0, 1})))
    claim_all(m, {0: 1, 1: 1})
    m.handle(Revoked(P({0, 1})))
    assert m.handle(Aborted()) == [Pause(P({0, 1})), RenewProducer()]
    assert m.handle(ProducerRenewed("w2", "w1")) == [RecordFenced(P({"w1"}))]
    assert m.handle(WindowFlushed(P({0, 1}))) == []
    assert not m.pending and not m.producer_claims


def test_a_failed_step_waits_for_proceed_and_is_repeated_with_the_same_producer() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    [claim] = m.handle(Proceed())
    assert m.handle(Failed(claim, "redis away")) == []
    assert m.pending
    assert m.handle(Proceed()) == [claim]  # same generation: no new producer


def test_every_asking_step_can_fail_and_be_retried() -> None:
    m = started(ids_current=lambda p, offset: False)
    m.handle(Assigned(P({0})))
    actions = m.handle(Proceed())
    steps = 0
    while actions:
        last = actions[-1]
        if not isinstance(last, own.Asking):
            break
        assert m.handle(Failed(last)) == []
        assert m.handle(Proceed())[-1] == last
        actions = claim_step(m, last)
        steps += 1
    assert m.reading == {0} and steps == 5  # claim, fence, fetch, seek, restore


def claim_step(m: Ownership, last: own.Action) -> list[own.Action]:
    match last:
        case Claim():
            return m.handle(Claimed(last, P({"x"})))
        case Fence(ids):
            return m.handle(Fenced(last, ids))
        case FetchCommitted(partitions):
            return m.handle(CommittedRead(last, dict.fromkeys(partitions, 3)))
        case Seek():
            return m.handle(Sought(last))
        case RestoreIds():
            return m.handle(IdsRestored(last))
    raise AssertionError(last)


def test_a_fence_that_partly_fails_retries_only_the_rest() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    [claim] = m.handle(Proceed())
    [fence] = m.handle(Claimed(claim, P({"x", "y"})))
    assert m.handle(Fenced(fence, P({"x"}))) == [RecordFenced(P({"x"}))]
    assert m.handle(Proceed()) == [Fence(P({"y"}))]


def test_ids_to_fence_stay_due_across_a_new_assignment() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    [claim] = m.handle(Proceed())
    [fence] = m.handle(Claimed(claim, P({"x"})))
    m.handle(Failed(fence))
    m.handle(Assigned(P({1})))  # partition 0 went elsewhere, but the owners hash names this worker
    assert m.handle(Proceed()) == [RenewProducer()]
    [_, claim2] = m.handle(ProducerRenewed("w2", "w1"))
    assert m.handle(Claimed(claim2, P())) == [Fence(P({"x"}))]


def test_an_answer_overtaken_by_a_new_assignment_is_stale() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    [claim] = m.handle(Proceed())
    m.handle(Assigned(P({0, 1})))  # the listener runs while the claim is on its way
    # the ids it displaced are still fenced; the claim itself counts for nothing
    assert m.handle(Claimed(claim, P({"x"}))) == [RenewProducer()]
    assert "x" in m.unfenced and m.claiming == {0, 1}


def test_stale_answers_change_nothing() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    seen = claim_all(m, {0: 1})
    fetch = next(a for a in seen if isinstance(a, FetchCommitted))
    seek = next(a for a in seen if isinstance(a, Seek))
    for event in (CommittedRead(fetch, {0: 9}), Sought(seek), HandedOver(HandOver(P({0}), "a", "b"), P())):
        assert m.handle(event) == []
    assert m.reading == {0}


def test_committed_offsets_missing_a_partition_are_read_again() -> None:
    m = started()
    m.handle(Assigned(P({0, 1})))
    seen = claim_all(m, {0: 1, 1: 1})
    assert seen[-1] == Resume(P({0, 1}))
    m.handle(Assigned(P({0, 1})))
    m.handle(Proceed())
    [_, claim] = m.handle(ProducerRenewed("w2", "w1"))
    fetch = m.handle(Claimed(claim, P()))[-1]
    assert isinstance(fetch, FetchCommitted)
    assert m.handle(CommittedRead(fetch, {0: 1})) == []  # never guess partition 1's offset
    assert m.handle(Proceed()) == [fetch]


def test_an_abort_while_a_claim_is_unanswered_claims_again_under_the_new_id() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    claim_all(m, {0: 1})
    m.handle(Assigned(P({0, 1})))
    m.handle(Proceed())
    [_, claim] = m.handle(ProducerRenewed("w2", "w1"))
    m.handle(Failed(claim))  # the claim may have landed: its answer was lost
    # (a flush cannot abort here, nothing is read; the machine still copes)
    assert m.handle(Aborted()) == [RenewProducer()]
    # nothing was read under w2: nothing to hand over; Redis still knows what w2's claim displaced
    assert m.handle(ProducerRenewed("w3", "w2")) == [RecordFenced(P({"w2"})), Claim(P({0, 1}), "w3")]


def test_forgotten_dead_ids_are_bounded() -> None:
    m = started()
    m.handle(Assigned(P({0})))
    [claim] = m.handle(Proceed())
    ids = P(f"x{i}" for i in range(own.DEAD_IDS_KEPT + 10))
    [fence] = m.handle(Claimed(claim, ids))
    m.handle(Fenced(fence, ids))
    assert sum(m.known_fenced(i) for i in ids) == own.DEAD_IDS_KEPT


def test_an_unknown_event_is_refused() -> None:
    with pytest.raises(TypeError):
        started().handle(object())  # type: ignore[arg-type]


# --- a model of the world, and random event sequences ---------------------------------------------

PARTITIONS = range(4)


class World:
    """Redis (owners, displaced, fenced ids), Kafka (fences, committed offsets) and rival workers,
    with the runtime's side of every action. Failures and lost answers are drawn by hypothesis."""

    def __init__(self, data: st.DataObject, dedup: bool) -> None:
        self.data = data
        self.faults = True
        self.owners: dict[int, str] = {}
        self.holders: dict[int, list[str]] = {}  # per partition, its holders not known fenced
        self.history: dict[int, list[str]] = defaultdict(list)  # every owner a partition had
        self.ours_at: dict[int, int] = {}  # len(history[p]) when this worker last wrote p
        self.recorded: set[str] = set()  # the fenced-ids set in Redis
        self.fenced: set[str] = set()  # ids fenced in Kafka
        self.instance_key: str | None = None
        self.next_id = 0
        self.committed: dict[int, int] = {}
        self.ids_at: dict[int, int] = {}  # where this worker's dedup state of a partition ends
        self.position: dict[int, int] = {}
        self.paused: set[int] = set()
        self.generation = 0
        self.claim_generation: dict[str, int] = {}  # the generation a producer last claimed in
        self.claimed_in: dict[str, set[int]] = defaultdict(set)  # what it claimed in that one
        self.taken: set[int] = set()  # said taken by a hand-over since the last assignment
        self.commits = 0
        self.m = Ownership(self.ids_current if dedup else None)
        self.dedup = dedup

    def ids_current(self, p: int, offset: int) -> bool:
        return self.ids_at.get(p) == offset

    def fault(self) -> bool:
        return self.faults and self.data.draw(st.integers(0, 5)) == 0

    # the runtime's loop: carry out actions in order, feeding answers back
    def carry(self, actions: list[own.Action]) -> None:
        for action in actions:
            answer = self.do(action)
            if answer is not None:
                self.carry(self.handle(answer))
        assert not self.m.reading & self.paused  # what it reads is not paused, once carried out

    def handle(self, event: own.Event) -> list[own.Action]:
        actions = self.m.handle(event)
        self.check()
        return actions

    def do(self, action: own.Action) -> own.Event | None:
        m = self.m
        match action:
            case Pause(partitions):
                assert not partitions & m.reading
                self.paused |= partitions
            case Resume(partitions):
                self.resumed(partitions)
            case DropIdsExcept(partitions):
                self.ids_at = {p: o for p, o in self.ids_at.items() if p in partitions}
            case DropState(partitions, ids, reason):
                if ids:
                    for p in partitions:
                        self.ids_at.pop(p, None)
                if reason == "taken":
                    self.taken |= partitions
            case RecordFenced(ids):
                assert ids <= self.fenced, "recorded as fenced, but it is not"
                self.recorded |= ids
            case Flush(partitions):
                self.flush()
                if self.fault():
                    self.carry(self.handle(FlushFailed(partitions)))
                    return None
                return WindowFlushed(partitions)
            case _:
                assert isinstance(action, own.Asking)
                if isinstance(action, Claim | HandOver):  # sent now, in this generation
                    claimant = action.producer_id if isinstance(action, Claim) else action.new_id
                    # a producer that holds claims of an earlier assignment never claims again
                    if self.claim_generation.get(claimant) != self.generation:
                        self.claim_generation[claimant] = self.generation
                        self.claimed_in[claimant] = set()
                    owned = {p for p, o in self.owners.items() if o == claimant}
                    earlier = owned - self.claimed_in[claimant]
                    assert not earlier, f"{claimant} claims again while holding {earlier} from before"
                    self.claimed_in[claimant] |= action.partitions
                if self.data.draw(st.integers(0, 9)) == 0 and self.faults:
                    self.assign()  # the group's listener runs while the step is on its way
                return self.ask(action)
        return None

    def ask(self, action: own.Asking) -> own.Event:
        m = self.m
        match action:
            case RenewProducer():
                assert not m.reading, "a producer renewed under partitions being read"
                if self.fault():
                    return Failed(action)
                new = f"w{self.next_id}"
                self.next_id += 1
                previous, self.instance_key = self.instance_key, new
                if previous is not None and self.fault():  # recorded in Redis, fence failed
                    return Failed(action)
                if previous is not None:
                    self.fenced.add(previous)
                return ProducerRenewed(new, previous)
            case Claim(partitions, producer_id):
                assert producer_id == m.producer_id
                if self.fault():
                    return Failed(action)
                previous = self.claim(partitions, producer_id)
                return Failed(action) if self.fault() else Claimed(action, previous)
            case HandOver(partitions, old_id, new_id):
                if self.fault():
                    return Failed(action)
                kept = self.hand_over(partitions, old_id, new_id)
                return Failed(action) if self.fault() else HandedOver(action, kept)
            case Fence(ids):
                done = P(i for i in ids if not self.fault())
                self.fenced |= done
                return Fenced(action, done)
            case FetchCommitted(partitions):
                if self.fault():
                    return Failed(action)
                return CommittedRead(action, {p: self.committed.get(p, NO_OFFSET) for p in partitions})
            case Seek(offsets):
                if self.fault():
                    return Failed(action)
                self.position.update(offsets)
                return Sought(action)
            case RestoreIds(offsets):
                if self.fault():
                    return Failed(action)
                self.ids_at.update(offsets)
                return IdsRestored(action)
        raise AssertionError(action)

    # Redis, as the scripts in io/partition_owners.py
    def claim(self, partitions: frozenset[int], claimant: str) -> frozenset[str]:
        previous: set[str] = set()
        for p in sorted(partitions):
            holders = [*self.holders.get(p, []), *([self.owners[p]] if p in self.owners else [])]
            kept = list(dict.fromkeys(i for i in holders if i != claimant and i not in self.recorded))
            previous.update(kept)
            if self.owners.get(p) != claimant:
                self.set_owner(p, claimant)
            self.ours_at[p] = len(self.history[p])
            self.holders[p] = kept
        return P(previous)

    def hand_over(self, partitions: frozenset[int], old_id: str, new_id: str) -> frozenset[int]:
        kept = set()
        for p in partitions:
            if self.owners.get(p) == old_id:
                self.set_owner(p, new_id)
                self.ours_at[p] = len(self.history[p])
            if self.owners.get(p) == new_id:
                kept.add(p)
        return P(kept)

    def set_owner(self, p: int, owner: str) -> None:
        self.owners[p] = owner
        self.history[p].append(owner)

    # what the worker's loop and the group do
    def flush(self) -> None:
        m = self.m
        if not m.reading:
            return
        producer = m.producer_id
        outcomes = ["abort"] if producer in self.fenced else ["ok", "abort", "lost"]
        outcome = self.data.draw(st.sampled_from(outcomes))
        if outcome in ("ok", "lost"):
            for p in m.reading:
                # the point of it all: a commit that succeeds is the owner's
                assert self.owners.get(p) == producer, f"partition {p} committed by a non-owner"
                self.committed[p] = max(0, self.committed.get(p, 0)) + 1
                if outcome == "ok":
                    self.ids_at[p] = self.committed[p]
            self.commits += 1
        if outcome != "ok":
            self.carry(self.handle(Aborted()))

    def assign(self) -> None:
        partitions = P(self.data.draw(st.sets(st.sampled_from(PARTITIONS))))
        self.generation += 1
        self.taken = set()
        actions = self.handle(Assigned(partitions))
        assert all(not isinstance(a, own.Asking | Flush) for a in actions)
        self.carry(actions)
        assert self.paused >= partitions

    def rival_claims(self) -> None:
        """Another worker claims a partition and fences its holder, then commits on it."""
        p = self.data.draw(st.sampled_from(PARTITIONS))
        rival = f"r{self.next_id}"
        self.next_id += 1
        holder = self.owners.get(p)
        self.set_owner(p, rival)
        if holder is not None:
            self.fenced.add(holder)
        if self.data.draw(st.booleans()):
            self.committed[p] = max(0, self.committed.get(p, 0)) + 1

    def resumed(self, partitions: frozenset[int]) -> None:
        m = self.m
        assert partitions <= m.reading and not partitions & m.held
        assert not partitions & self.taken, "read again after a hand-over said it was taken"
        self.paused -= partitions
        for p in partitions:
            if self.owners.get(p) != m.producer_id:
                # only a rival that claimed it since may own it (and it fenced this producer)
                assert any(o.startswith("r") for o in self.history[p][self.ours_at[p] :]), p
                continue
            before = self.history[p][: self.ours_at[p]]
            unfenced = {o for o in before if o != m.producer_id and o not in self.fenced}
            assert not unfenced, f"partition {p} read before {unfenced} were fenced"
            assert self.position[p] == self.committed.get(p, NO_OFFSET), "not at its committed offset"
            if self.dedup:
                assert self.ids_at.get(p) == self.committed.get(p, NO_OFFSET), "stale dedup ids read on"

    def check(self) -> None:
        m = self.m
        rewinding = m.rewinding
        assert not (m.reading & m.claiming or m.reading & rewinding or m.claiming & rewinding)
        assert m.reading | m.claiming | rewinding <= m.assigned
        assert m.reading | rewinding <= m.producer_claims
        assert not m.reading & self.taken


@settings(max_examples=400, deadline=None)
@given(st.data(), st.booleans())
def test_random_event_sequences_keep_every_invariant(data: st.DataObject, dedup: bool) -> None:
    w = World(data, dedup)
    w.carry(w.handle(Proceed()))
    for _ in range(data.draw(st.integers(1, 30))):
        step = data.draw(st.sampled_from(["assign", "revoke", "flush", "rival", "proceed", "proceed"]))
        if step == "assign":
            w.assign()
        elif step == "revoke":
            w.carry(w.handle(Revoked(w.m.assigned)))
        elif step == "flush":
            w.flush()
        elif step == "rival":
            w.rival_claims()
        else:
            w.carry(w.handle(Proceed()))
    # with nothing failing any more, every assigned partition not taken is read
    w.faults = False
    for _ in range(10):
        w.carry(w.handle(Proceed()))
    assert not w.m.pending
    assert w.m.held == w.taken & w.m.assigned
    assert w.m.reading == w.m.assigned - w.taken
