"""Hot-key splitting for writers: which keys are hot, and over how many sub-keys to spread them.

A viral key sends every event to one Kafka partition, hence one tier-1 worker.
Each writer keeps local statistics of key rates in a heavy-hitter sketch
(Apache DataSketches' frequent-items sketch: memory is fixed whatever the key
cardinality) and, when a key's rate crosses `threshold_eps`, spreads its events
over k sub-keys, k = ceil(rate / budget_eps), so each sub-key stays under a
per-partition budget. It returns to one key with hysteresis: only once the
rate has stayed under threshold/2 for `cooldown_s`. Readers (tier 1 and the
root) always merge every sub-key.

Writers agree on what is hot. Each writer sees only its share of a key: five
gateways behind a load balancer, each at 800 events/s of one key, would never
split it alone although its partition takes 4,000/s. So at the end of every
interval a writer shares the rates it measured (`report()`: keys at or above
`share_floor` of the threshold, the `max_shared_keys` heaviest) and receives the
sum over every writer (`agree()`; the shared store is `io/splits.SharedRates`,
modelled by `RateBoard` here). A key's rate is then the larger of the writer's
own and the writers' sum, while that sum is fresh (`shared_ttl_s`); so a key
splits when the writers together see it hot and merges back only once the sum,
hence every writer, has been cool for the cooldown. Every writer deciding from the
same sum proposes the same k; the history keeps the largest proposed.

Per key the decision is a small state machine (`next_state`), fed the k the
rate asks for (`wanted_k`) at every decision:

| state | wanted k | next |
|---|---|---|
| (k, -) | above k | (wanted, -): split or grow at once |
| (k, any) | k | (k, -) |
| (k, -) | below k | (k, now): cooling starts |
| (k, since) | below k, now - since < cooldown | unchanged |
| (k, since) | below k, now - since >= cooldown | (wanted, -): shrink, or one key at 1 |

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
from typing import NamedTuple

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
    # agreement between writers: a writer shares the rates of keys at or above this share of the
    # threshold (at most `max_shared_keys` of them), and decides by the writers' sum while it is
    # younger than `shared_ttl_s` (0: three intervals, see `shared_ttl`), then by its own rates alone
    share_floor: float = 0.05
    max_shared_keys: int = 64
    shared_ttl_s: float = 0.0

    @property
    def shared_ttl(self) -> float:
        """How long a report (and the writers' sum received) counts: unless set, three of the intervals at
        which a writer shares (an interval, or the refresh when that is longer: writers tick at refreshes)."""
        return self.shared_ttl_s or 3 * max(self.interval_s, self.refresh_s)

    def __post_init__(self) -> None:
        if self.threshold_eps <= 0 or self.budget_eps <= 0 or self.interval_s <= 0 or self.cooldown_s < 0:
            raise ValueError("threshold, budget and interval must be positive, cooldown not negative")
        if self.refresh_s <= 0 or self.lead_s < 2 * self.refresh_s:
            raise ValueError("refresh must be positive and the lead at least twice the refresh interval")
        if not 1 <= self.max_k <= MAX_SUBKEYS or not 0 <= self.static_k <= MAX_SUBKEYS:
            raise ValueError(f"max_k and static_k must be within [1, {MAX_SUBKEYS}]")
        if not 0 < self.share_floor <= 1 or self.max_shared_keys < 1 or self.shared_ttl_s < 0:
            raise ValueError("share_floor within (0, 1], max_shared_keys positive, shared_ttl_s not negative")


class KeyState(NamedTuple):
    """A key's split as one writer decides it: k (1: one key), and since when a smaller k is asked for."""

    k: int
    low_since: float | None = None


ONE_KEY = KeyState(1)


def next_state(state: KeyState, wanted: int, now: float, cooldown_s: float) -> KeyState:
    """The transition of the table above: grow at once, shrink only after `cooldown_s` of asking less."""
    if wanted > state.k:
        return KeyState(wanted)
    if wanted == state.k:
        return state if state.low_since is None else KeyState(state.k)
    if state.low_since is None:
        return KeyState(state.k, now)
    if now - state.low_since >= cooldown_s:
        return KeyState(wanted)
    return state


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
        self._splits: dict[str, KeyState] = {}  # keys split now (k > 1)
        # the writers' summed rates (key -> events/s), and until when they count
        self._shared: dict[str, float] = {}
        self._shared_until = -math.inf
        self._report_due = False
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
        self._report_due = True
        return self._decide(now)

    # -- agreement with the other writers -------------------------------------------------------

    def report(self) -> dict[str, int]:
        """What this writer shares of its last interval: key -> events/s (rounded, at least 1), for keys
        at or above `share_floor` of the threshold, the `max_shared_keys` heaviest."""
        p = self.policy
        floor = p.threshold_eps * p.share_floor
        heavy = sorted(
            ((key, rate) for key, rate in self._rates.items() if rate >= floor),
            key=lambda kv: kv[1],
            reverse=True,
        )
        return {key: max(1, round(rate)) for key, rate in heavy[: p.max_shared_keys]}

    def take_report(self) -> dict[str, int] | None:
        """The report of the interval that closed since the last call, once; None when none closed."""
        if not self._report_due:
            return None
        self._report_due = False
        return self.report()

    def agree(self, totals: Mapping[str, float], now: float) -> dict[str, int]:
        """The writers' summed rates arrived (keys absent: under what the store returns); decide again.

        Until `shared_ttl` has passed a key's rate is the larger of this writer's own and the sum.
        Returns the changed splits, as `tick` does."""
        self._shared = dict(totals)
        self._shared_until = now + self.policy.shared_ttl
        return self._decide(now)

    def shared_fresh(self, now: float) -> bool:
        """True while the writers' sum counts (received within `shared_ttl`)."""
        return now < self._shared_until

    def cooling(self, key: str) -> bool:
        """True while `key` is split and its rate asks for less, the cooldown not yet over."""
        state = self._splits.get(key)
        return state is not None and state.low_since is not None

    def asks(self, latest: Callable[[str], int]) -> dict[str, int]:
        """What this writer asks of the shared split history: its splits, except that a split cooling
        down asks for no more than the history holds (`latest`), so that a writer whose cooldown ends a
        moment later never grows back a split another writer, agreeing by the sums, just ended."""
        out: dict[str, int] = {}
        for key, state in self._splits.items():
            k = state.k if state.low_since is None else min(state.k, latest(key))
            if k > 1:
                out[key] = k
        return out

    def shared_rate(self, key: str) -> float:
        """The writers' summed rate of `key` as last received (0 when not among the hot)."""
        return self._shared.get(key, 0.0)

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

    def rates(self, now: float) -> dict[str, float]:
        """The rate every decision goes by: per key the larger of this writer's own and the writers' sum
        (while that is fresh)."""
        rates = self._rates
        if not self._shared or not self.shared_fresh(now):
            return rates
        rates = dict(rates)
        for key, total in self._shared.items():
            if total > rates.get(key, 0.0):
                rates[key] = total
        return rates

    def _decide(self, now: float) -> dict[str, int]:
        changed: dict[str, int] = {}
        rates = self.rates(now)
        splits = self._splits
        cooldown = self.policy.cooldown_s
        for key, rate in rates.items():
            if key not in splits:
                k = self.wanted_k(rate)
                if k > 1:
                    splits[key] = KeyState(k)
                    changed[key] = k
        for key, state in list(splits.items()):
            new = next_state(state, self.wanted_k(rates.get(key, 0.0), state.k), now, cooldown)
            if new.k != state.k:
                changed[key] = new.k
            if new.k == 1:
                del splits[key]
            else:
                splits[key] = new
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
        state = self._splits.get(key)
        return self.router.sub_of(key, event_id, state.k if state is not None else self.policy.static_k)

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


class RateBoard:
    """The shared store of rates as the writers see it (`io/splits.SharedRates` runs the same in Redis).

    Each writer's latest report (key -> events/s) replaces its previous one and counts until
    it expires; a writer that stops withdraws it. `put` answers the sum over every live
    report, keys whose sum is at least `min_total` only.
    """

    def __init__(self) -> None:
        self.reports: dict[str, tuple[dict[str, int], float]] = {}  # writer -> (report, expiry)

    def put(
        self, writer: str, report: Mapping[str, int], now: float, ttl: float, min_total: float = 0
    ) -> dict[str, int]:
        self.reports = {w: r for w, r in self.reports.items() if r[1] > now}
        if report:
            self.reports[writer] = (dict(report), now + ttl)
        else:
            self.reports.pop(writer, None)
        return self.totals(min_total)

    def withdraw(self, writer: str) -> None:
        self.reports.pop(writer, None)

    def totals(self, min_total: float = 0) -> dict[str, int]:
        sums: dict[str, int] = {}
        for report, _ in self.reports.values():
            for key, rate in report.items():
                sums[key] = sums.get(key, 0) + rate
        return {key: total for key, total in sums.items() if total >= min_total}
