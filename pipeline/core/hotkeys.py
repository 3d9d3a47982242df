"""Hot-key splitting for writers: which keys are hot, and over how many sub-keys to spread them.

A viral key sends every event to one Kafka partition, hence one tier-1 worker.
Each writer keeps local statistics of key rates in a heavy-hitter sketch
(Apache DataSketches' frequent-items sketch: memory is fixed whatever the key
cardinality) and, when a key's rate crosses `threshold_eps`, spreads its events
over k sub-keys, k = ceil(rate / budget_eps), so each sub-key stays under a
per-partition budget. It returns to one key with hysteresis: only once the
rate has stayed under threshold/2 for `cooldown_s`. Readers (tier 1 and the
root) always merge every sub-key.

What a writer decides is a proposal: the k an event is routed by is the one in
force at the event's `ts` in the split history every writer shares
(`core/split_history.py`), so a retry that carries its original's `ts` lands on
the same sub-key, hence the same partition (where tier 1 holds the ids it
counted), whichever writer sends it and however k changed meanwhile
(`SubKeyRouter`). The sub-key of an event is a stable hash of its id.
Sans-I/O: the caller passes the clocks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import datasketches

from pipeline.core.model import MAX_SUBKEYS, message_key
from pipeline.core.split_history import SplitHistory, k_at

# How a Kafka message key maps to a partition (the producer's partitioner), when known.
PartitionOf = Callable[[bytes], int]

DEFAULT_LG_MAX_ITEMS = 10  # 1024-slot map: tracks up to 768 keys, error ≤ 3.5/1024 of the interval's events
_SUBS_CACHE_MAX = 8192


@dataclass(frozen=True, slots=True)
class SplitPolicy:
    """When to split, how far, and when to stop. Rates are events/s seen by this writer."""

    threshold_eps: float = 1000.0
    budget_eps: float = 1000.0  # per sub-key: k = ceil(rate / budget)
    max_k: int = 64
    interval_s: float = 1.0  # rates are measured over intervals this long
    cooldown_s: float = 10.0  # a split shrinks only after the rate has stayed low this long
    static_k: int = 0  # static mode: every key split this many ways (0 or 1: off)
    # shared split history: a change takes effect `lead_s` after it is proposed; writers read the
    # history back every `refresh_s`, so each knows a change before it is in force (lead >= 2 x refresh)
    lead_s: float = 2.0
    refresh_s: float = 0.5

    def __post_init__(self) -> None:
        if self.threshold_eps <= 0 or self.budget_eps <= 0 or self.interval_s <= 0 or self.cooldown_s < 0:
            raise ValueError("threshold, budget and interval must be positive, cooldown not negative")
        if self.refresh_s <= 0 or self.lead_s < 2 * self.refresh_s:
            raise ValueError("refresh must be positive and the lead at least twice the refresh interval")
        if not 1 <= self.max_k <= MAX_SUBKEYS or not 0 <= self.static_k <= MAX_SUBKEYS:
            raise ValueError(f"max_k and static_k must be within [1, {MAX_SUBKEYS}]")


@dataclass(slots=True)
class _Split:
    k: int
    low_since: float | None = None  # when the rate first asked for a smaller k, while it still does


class HotKeySplitter:
    """Heavy-hitter sketch of key rates, and the current split (k) of every hot key."""

    def __init__(
        self,
        policy: SplitPolicy | None = None,
        *,
        now: float = 0.0,
        lg_max_items: int = DEFAULT_LG_MAX_ITEMS,
        partitions: int = 0,
        partition_of: PartitionOf | None = None,
    ) -> None:
        self.policy = policy or SplitPolicy()
        self.lg_max_items = lg_max_items
        self._sketch = datasketches.frequent_strings_sketch(lg_max_items)
        self._interval_start = now
        self._rates: dict[str, float] = {}
        self._splits: dict[str, _Split] = {}
        self.router = SubKeyRouter(SplitHistory(), self.policy.static_k)
        if partitions:
            self.use_partitions(partitions, partition_of)

    @property
    def partitions(self) -> int:
        return self.router.partitions

    @property
    def history(self) -> SplitHistory:
        """The split history events are routed by (filled by the writer from the shared store)."""
        return self.router.history

    def use_partitions(self, partitions: int, partition_of: PartitionOf | None) -> None:
        """Cap k at the partition count; with the partitioner, give each sub-key its own partition."""
        self.router.use_partitions(partitions, partition_of)

    def restart(self, now: float) -> None:
        """Start measuring afresh from `now` (e.g. when the writer connects); current splits stay."""
        self._sketch = datasketches.frequent_strings_sketch(self.lg_max_items)
        self._interval_start = now

    # -- statistics ---------------------------------------------------------------------------

    def observe(self, key: str, n: int = 1) -> None:
        self._sketch.update(key, n)

    def observe_counts(self, counts: Mapping[str, int]) -> None:
        """A batch's keys at once (one sketch update per distinct key)."""
        update = self._sketch.update
        for key, n in counts.items():
            update(key, n)

    def tick(self, now: float) -> dict[str, int]:
        """Close the measuring interval if it is over; return the changed splits (key -> k, 1: unsplit)."""
        elapsed = now - self._interval_start
        if elapsed < self.policy.interval_s:
            return {}
        items = self._sketch.get_frequent_items(datasketches.frequent_items_error_type.NO_FALSE_NEGATIVES)
        self._rates = {item[0]: item[1] / elapsed for item in items}
        self._sketch = datasketches.frequent_strings_sketch(self.lg_max_items)
        self._interval_start = now
        return self._decide(now)

    def _cap(self) -> int:
        cap = self.policy.max_k
        if self.router.partitions and self.router.partition_of is not None:
            cap = min(cap, self.router.partitions)  # one sub-key per partition: more would share partitions
        return max(1, cap)

    def wanted_k(self, rate: float, current: int = 1) -> int:
        """The k a rate asks for, before hysteresis: 1 under threshold/2 (under threshold if unsplit)."""
        p = self.policy
        if rate >= p.threshold_eps or (current > 1 and rate >= p.threshold_eps / 2):
            return max(2, min(self._cap(), math.ceil(rate / p.budget_eps)))
        return 1

    def _decide(self, now: float) -> dict[str, int]:
        changed: dict[str, int] = {}
        rates = self._rates
        for key, rate in rates.items():
            if key not in self._splits:
                k = self.wanted_k(rate)
                if k > 1:
                    self._splits[key] = _Split(k)
                    changed[key] = k
        for key, split in list(self._splits.items()):
            want = self.wanted_k(rates.get(key, 0.0), split.k)
            if want > split.k:
                split.k, split.low_since = want, None
                changed[key] = want
            elif want == split.k:
                split.low_since = None
            elif split.low_since is None:
                split.low_since = now
            elif now - split.low_since >= self.policy.cooldown_s:
                changed[key] = want
                if want == 1:
                    del self._splits[key]
                else:
                    split.k, split.low_since = want, None
        return changed

    # -- decisions -------------------------------------------------------------------------

    def k(self, key: str) -> int:
        """The k this writer wants for `key` now (what it proposes; events follow the history)."""
        split = self._splits.get(key)
        if split is not None:
            return split.k
        return self.policy.static_k or 1

    def sub_for(self, key: str, event_id: str | None, ts_ms: int | None = None) -> int:
        """The sub-key of one event, stable in its id.

        With `ts_ms` (what writers pass): by the k in force at that time in the split history,
        so a retry carrying its original's ts lands on the same sub-key whatever changed since.
        Without: by this writer's own current decision (a lone writer, tests).
        """
        if ts_ms is not None:
            return self.router.sub_for(key, event_id, ts_ms)
        split = self._splits.get(key)
        return self.router.sub_of(key, event_id, split.k if split is not None else self.policy.static_k)

    def subs(self, key: str, k: int) -> tuple[int, ...]:
        """The k sub-key numbers of a key; with a known partitioner, on k distinct partitions."""
        return self.router.subs(key, k)

    # -- what operators see ------------------------------------------------------------------

    @property
    def splits(self) -> dict[str, int]:
        """Keys this writer splits by rate now (static mode is not listed: it applies to every key)."""
        return {key: s.k for key, s in self._splits.items()}

    def top_rates(self, n: int = 20) -> list[tuple[str, float]]:
        """The heaviest keys of the last interval, with their estimated rate (events/s)."""
        return sorted(self._rates.items(), key=lambda kv: kv[1], reverse=True)[:n]

    @property
    def tracked_items(self) -> int:
        """Keys held in the sketch now (bounded by the sketch size whatever the cardinality)."""
        return int(self._sketch.num_active_items)


class SubKeyRouter:
    """Where an event goes: k from the split history at the event's ts, the sub-key a stable hash of its id.

    Every writer with the same history, partition count and partitioner routes an event
    with a given key, id and ts to the same sub-key.
    """

    def __init__(
        self,
        history: SplitHistory | None = None,
        static_k: int = 0,
        partitions: int = 0,
        partition_of: PartitionOf | None = None,
    ) -> None:
        self.history = history if history is not None else SplitHistory()
        self.static_k = static_k
        self.partitions = partitions
        self.partition_of = partition_of
        self._subs: dict[tuple[str, int], tuple[int, ...]] = {}
        self._round_robin = 0

    @property
    def active(self) -> bool:
        """False when every event goes to its plain key (no history, no static split): skip routing."""
        return self.static_k > 1 or bool(self.history.histories)

    def use_partitions(self, partitions: int, partition_of: PartitionOf | None) -> None:
        self.partitions = partitions
        self.partition_of = partition_of
        self._subs.clear()

    def k_at(self, key: str, ts_ms: int) -> int:
        history = self.history.histories.get(key)
        k = (history[-1][1] if ts_ms >= history[-1][0] else k_at(history, ts_ms)) if history else 1
        return k if k > 1 else (self.static_k or 1)

    def sub_for(self, key: str, event_id: str | None, ts_ms: int) -> int:
        history = self.history.histories.get(key)
        if history is None:
            k = self.static_k
        else:
            last = history[-1]
            k = last[1] if ts_ms >= last[0] else k_at(history, ts_ms)
            if k <= 1:
                k = self.static_k
        return self.sub_of(key, event_id, k)

    def sub_of(self, key: str, event_id: str | None, k: int) -> int:
        """The sub-key of an event when `key` is split `k` ways."""
        if k <= 1:
            return 0
        if event_id is None:
            self._round_robin += 1
            slot = self._round_robin % k
        else:
            slot = zlib.crc32(event_id.encode()) % k
        subs = self._subs.get((key, k))  # inline: this runs for every event of a split key
        return (subs if subs is not None else self.subs(key, k))[slot]

    def subs(self, key: str, k: int) -> tuple[int, ...]:
        """The k sub-key numbers of a key; with a known partitioner, on k distinct partitions."""
        cached = self._subs.get((key, k))
        if cached is not None:
            return cached
        partition_of = self.partition_of
        if partition_of is None or not self.partitions or k > self.partitions:
            subs = tuple(range(k))
        else:
            subs = _spread(key, k, self.partitions, partition_of)
        if len(self._subs) >= _SUBS_CACHE_MAX:
            self._subs.clear()
        self._subs[(key, k)] = subs
        return subs


def _spread(key: str, k: int, partitions: int, partition_of: PartitionOf) -> tuple[int, ...]:
    """Sub-key numbers landing on k consecutive partitions, starting at the key's own (sub 0)."""
    home = partition_of(message_key(key, 0)) % partitions
    wanted = [(home + i) % partitions for i in range(k)]
    found: dict[int, int] = {home: 0}
    for sub in range(1, MAX_SUBKEYS):
        if len(found) == k:
            break
        p = partition_of(message_key(key, sub))
        if p in wanted and p not in found:
            found[p] = sub
    if len(found) < k:  # a partitioner that never reaches some partition: fall back to plain numbers
        return tuple(range(k))
    return tuple(found[p] for p in wanted)
