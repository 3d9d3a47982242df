"""The fault schedule of a chaos run: which fault, when, on whom, for how long. No I/O.

A plan is a pure function of the seed, so a failing run can be replayed exactly
(the same faults at the same moments; the servers' timing still varies).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    KILL_COALESCE = "kill_coalesce"  # SIGKILL a tier-1 worker, restart it with the same --instance
    KILL_MERGE = "kill_merge"  # SIGKILL a root merger, restart it likewise
    KILL_BROADCAST = "kill_broadcast"  # SIGKILL the broadcast node, restart it likewise
    RESTART_REDIS = "restart_redis"  # SIGTERM Redis (AOF keeps the data), start it again
    RESTART_BROKER = "restart_broker"  # SIGTERM the broker (it flushes), start it again
    KILL_BROKER = "kill_broker"  # SIGKILL one broker of a cluster (a partials or coordinator leader too)
    KILL_FOR_GOOD = "kill_for_good"  # SIGKILL a tier-1 worker or a root, never restarted: fail-over
    ADD_COALESCE = "add_coalesce"  # a new tier-1 instance joins the group (a rebalance)
    REMOVE_COALESCE = "remove_coalesce"  # a tier-1 worker stops gracefully for good (a rebalance)
    ADD_MERGE = "add_merge"  # a new root merger joins its group
    REMOVE_MERGE = "remove_merge"  # a root merger stops gracefully for good
    # SIGKILL a master of a Redis Cluster: its replica is promoted (or, without one, it restarts from its
    # AOF); restarted after the pause, it comes back as a replica
    KILL_REDIS_MASTER = "kill_redis_master"
    KILL_SINK = "kill_sink"  # SIGKILL the PostgreSQL sink, restart it with the same --instance
    RESTART_POSTGRES = "restart_postgres"  # stop PostgreSQL (fast shutdown), start it again


# Relative weights: worker kills are the common case, server restarts and scale-out rarer.
DEFAULT_WEIGHTS: Mapping[FaultKind, float] = {
    FaultKind.KILL_COALESCE: 5,
    FaultKind.KILL_MERGE: 3,
    FaultKind.KILL_BROADCAST: 1,
    FaultKind.RESTART_REDIS: 2,
    FaultKind.RESTART_BROKER: 2,
    FaultKind.ADD_COALESCE: 1,
    FaultKind.REMOVE_COALESCE: 1,
    FaultKind.ADD_MERGE: 1,
    FaultKind.REMOVE_MERGE: 1,
}
# On a cluster of Apache Kafka brokers: brokers die by SIGKILL at any moment (no gentler SIGTERM
# restarts: each broker fault stalls the writers for seconds), and workers die for good.
CLUSTER_WEIGHTS: Mapping[FaultKind, float] = {
    **DEFAULT_WEIGHTS,
    FaultKind.RESTART_BROKER: 0,
    FaultKind.KILL_BROKER: 1,
    FaultKind.KILL_FOR_GOOD: 1,
}
CLUSTER_REQUIRED: Mapping[FaultKind, int] = {FaultKind.KILL_BROKER: 3, FaultKind.KILL_FOR_GOOD: 2}
# On a Redis Cluster (`pipeline chaos --redis cluster`): masters die by SIGKILL, at least twice a run
REDIS_CLUSTER_WEIGHTS: Mapping[FaultKind, float] = {FaultKind.KILL_REDIS_MASTER: 2}
REDIS_CLUSTER_REQUIRED: Mapping[FaultKind, int] = {FaultKind.KILL_REDIS_MASTER: 2}
# With the PostgreSQL sink (`pipeline chaos --sink postgres`): its own kills and PostgreSQL restarts,
# at least 3 and 1 of them in every run
SINK_WEIGHTS: Mapping[FaultKind, float] = {FaultKind.KILL_SINK: 3, FaultKind.RESTART_POSTGRES: 1}
SINK_REQUIRED: Mapping[FaultKind, int] = {FaultKind.KILL_SINK: 3, FaultKind.RESTART_POSTGRES: 1}
SERVER_FAULTS = frozenset(
    {FaultKind.RESTART_REDIS, FaultKind.RESTART_BROKER, FaultKind.KILL_BROKER, FaultKind.RESTART_POSTGRES}
)
# the tiers a kill for good alternates between (tier 1 first): their partitions must fail over
FOR_GOOD_TIERS = ("coalesce", "merge")
KILLS = {
    FaultKind.KILL_COALESCE: "coalesce",
    FaultKind.KILL_MERGE: "merge",
    FaultKind.KILL_BROADCAST: "broadcast",
    FaultKind.KILL_SINK: "sink",
}
ADDS = {FaultKind.ADD_COALESCE: "coalesce", FaultKind.ADD_MERGE: "merge"}
REMOVALS = {FaultKind.REMOVE_COALESCE: "coalesce", FaultKind.REMOVE_MERGE: "merge"}


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float  # seconds after the load starts
    kind: FaultKind
    target: int  # which worker of its tier (taken modulo the number running), or which broker
    pause_s: float  # how long the victim stays down before it is restarted
    tier: str = ""  # the tier of a kill for good


def plan_faults(
    seed: int,
    count: int,
    duration_s: float,
    *,
    weights: Mapping[FaultKind, float] = DEFAULT_WEIGHTS,
    max_added: int = 1,
    max_pause_s: float = 2.0,
    window: tuple[float, float] = (0.1, 0.85),
    workers: Mapping[str, int] | None = None,
    required: Mapping[FaultKind, int] | None = None,
) -> list[Fault]:
    """`count` faults at random moments inside `window` (fractions of the run), sorted by time.

    Kinds whose weight is 0 never appear; at most `max_added` additions per tier
    (each adds a process for the rest of the run), and a removal or a kill for
    good only while its tier keeps at least one worker (`workers`: how many each
    tier starts with). `required` kinds appear at least that often (in random
    places among the others). Every fault fits in the window, so the pipeline
    always gets the tail of the run to settle before the drain.
    """
    if count < 0 or duration_s <= 0:
        raise ValueError("count must be >= 0 and duration positive")
    rng = random.Random(seed)
    kinds = [k for k in FaultKind if weights.get(k, 0) > 0]
    if count and not kinds:
        raise ValueError("no fault kind has a positive weight")
    start, end = window[0] * duration_s, window[1] * duration_s
    times = sorted(rng.uniform(start, end) for _ in range(count))
    faults: list[Fault] = []
    running = {"coalesce": 2, "merge": 2, **(workers or {})}
    added = dict.fromkeys(running, 0)
    for_good = 0
    must = [k for k, n in (required or {}).items() for _ in range(n)]
    if len(must) > count:
        raise ValueError(f"{len(must)} required faults do not fit in {count}")
    # the moments (indexes into `times`) that get a required kind
    must_at = dict(zip(sorted(rng.sample(range(count), len(must))), must, strict=True))

    def removes(kind: FaultKind) -> str | None:
        if kind in REMOVALS:
            return REMOVALS[kind]
        return FOR_GOOD_TIERS[for_good % len(FOR_GOOD_TIERS)] if kind is FaultKind.KILL_FOR_GOOD else None

    def reserved(tier: str, n: int) -> int:
        """Workers of `tier` that the required kills for good from moment n on will take."""
        later = sum(k is FaultKind.KILL_FOR_GOOD for i, k in must_at.items() if i >= n)
        return sum(FOR_GOOD_TIERS[(for_good + j) % len(FOR_GOOD_TIERS)] == tier for j in range(later))

    def possible(kind: FaultKind, n: int, required: bool = False) -> bool:
        if kind in ADDS:
            return added[ADDS[kind]] < max_added
        tier = removes(kind)
        if tier is None:
            return True
        if required:
            return running[tier] > 1
        if kind is FaultKind.KILL_FOR_GOOD and reserved(tier, n):
            return False  # an unplanned one would shift which tiers the required ones hit
        return running[tier] - reserved(tier, n) > 1

    for n, at in enumerate(times):
        wanted = must_at.get(n)
        if wanted is not None and possible(wanted, n, required=True):
            kind = wanted
        else:
            allowed = [k for k in kinds if possible(k, n)]
            if not allowed:
                raise ValueError("no fault kind is possible: give a kill or restart a positive weight")
            kind = rng.choices(allowed, weights=[weights[k] for k in allowed])[0]
        tier = removes(kind) or ""
        if kind in ADDS:
            added[ADDS[kind]] += 1
            running[ADDS[kind]] += 1
        if tier:
            running[tier] -= 1
        if kind is FaultKind.KILL_FOR_GOOD:
            for_good += 1
        scaling = kind in ADDS or kind in REMOVALS or kind is FaultKind.KILL_FOR_GOOD
        pause = 0.0 if scaling else round(rng.uniform(0.1, max_pause_s), 2)
        faults.append(
            Fault(
                round(at, 2),
                kind,
                rng.randrange(1_000),
                pause,
                tier if kind is FaultKind.KILL_FOR_GOOD else "",
            )
        )
    return faults


def breakdown(faults: list[Fault]) -> dict[str, int]:
    """Faults per kind, every kind listed (0 when absent), for the report."""
    out = {k.value: 0 for k in FaultKind}
    for f in faults:
        out[f.kind.value] += 1
    return out
