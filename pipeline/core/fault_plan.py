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
    ADD_COALESCE = "add_coalesce"  # a new tier-1 instance joins the group (a rebalance)


# Relative weights: worker kills are the common case, server restarts and scale-out rarer.
DEFAULT_WEIGHTS: Mapping[FaultKind, float] = {
    FaultKind.KILL_COALESCE: 5,
    FaultKind.KILL_MERGE: 3,
    FaultKind.KILL_BROADCAST: 1,
    FaultKind.RESTART_REDIS: 2,
    FaultKind.RESTART_BROKER: 2,
    FaultKind.ADD_COALESCE: 1,
}
SERVER_FAULTS = frozenset({FaultKind.RESTART_REDIS, FaultKind.RESTART_BROKER})


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float  # seconds after the load starts
    kind: FaultKind
    target: int  # which worker of its tier (taken modulo the number running)
    pause_s: float  # how long the victim stays down before it is restarted


def plan_faults(
    seed: int,
    count: int,
    duration_s: float,
    *,
    weights: Mapping[FaultKind, float] = DEFAULT_WEIGHTS,
    max_added: int = 1,
    max_pause_s: float = 2.0,
    window: tuple[float, float] = (0.1, 0.85),
) -> list[Fault]:
    """`count` faults at random moments inside `window` (fractions of the run), sorted by time.

    Kinds whose weight is 0 never appear; at most `max_added` ADD_COALESCE faults
    (each adds a process for the rest of the run). Every fault fits in the window,
    so the pipeline always gets the tail of the run to settle before the drain.
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
    added = 0
    for at in times:
        allowed = [k for k in kinds if k is not FaultKind.ADD_COALESCE or added < max_added]
        kind = rng.choices(allowed, weights=[weights[k] for k in allowed])[0]
        added += kind is FaultKind.ADD_COALESCE
        pause = 0.0 if kind is FaultKind.ADD_COALESCE else round(rng.uniform(0.1, max_pause_s), 2)
        faults.append(Fault(round(at, 2), kind, rng.randrange(1_000), pause))
    return faults


def breakdown(faults: list[Fault]) -> dict[str, int]:
    """Faults per kind, every kind listed (0 when absent), for the report."""
    out = {k.value: 0 for k in FaultKind}
    for f in faults:
        out[f.kind.value] += 1
    return out
