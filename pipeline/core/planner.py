"""Capacity planning: what a workload will cost each tier, before running it.

A closed-form model of the reduction. Keys follow a Zipf law; within a time
span t a key with probability p is seen at least once with probability
1 - exp(-rate * t * p) (Poisson arrivals), so the expected number of distinct
keys — hence cells, hence Redis commands — in a window is a sum over keys.
The model is checked against measured runs in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.core import coalescer, dedup

# Capacities measured on the 2-core reference machine (docs/BENCHMARKS.md), halved for headroom.
TIER1_EVENTS_PER_WORKER = 75_000.0
MERGE_CELLS_PER_WORKER = 50_000.0
# Draining a backlog on the 2-core reference machine, tier 1 + root + broker + Redis together
# (`pipeline bench cardinality`, docs/BENCHMARKS.md): a cost per event, one per cell and a fixed
# latency per backlog (the first window to fill and reach the root, the last to be flushed, committed
# and applied), fitted to four runs of the same pipeline code on 2026-11-30 (19:36, 19:41, 19:57,
# 20:00; partials v2, the apply answering its values in one string, tier 1 committing in the
# background): least squares on the relative error of events/s at 1, 2, 10 and 100 events per key,
# within 19 % of each run at every ratio (the runs themselves differ by up to 40 %: the machine is
# shared). Without the latency term the fit kept an error of one sign at 10 per key, which the
# commands per cell there inherit. Against two earlier runs (19:26, 19:28, before tier 1's background
# commit) it is 25-29 % low at one event per key.
DRAIN_US_PER_EVENT = 3.7
DRAIN_US_PER_CELL = 7.0
DRAIN_LATENCY_S = 0.81
# How fast the root applies, as wall time per cell on those shared cores: while it applies one window,
# eps / per_key * ROOT_US_PER_CELL windows arrive; above one it cannot keep up, and each apply takes
# what arrived during the last (fitted to the same runs' commands per cell, centred at one and two
# events per key, where it merges about 2.3 and 2 windows per apply; it keeps up at 10 and 100)
ROOT_US_PER_CELL = 44.0


def zipf_weights(n: int, s: float) -> list[float]:
    """The Zipf law of key popularity: rank i (0 = hottest) has weight 1 / (i + 1)^s.

    One place: the workloads draw their keys with it (pipeline/harness/zipf.py), and the planner
    predicts with it, so a benchmark's keys and the model of them cannot drift apart.
    """
    return [1.0 / (i + 1) ** s for i in range(n)]

@dataclass(frozen=True)
class Workload:
    events_per_s: float
    keys: int
    zipf_s: float = 1.1
    hot_share: float = 0.0  # share of all events on one extra viral key
    channels: int = 20
    flush_interval_s: float = 0.25
    events_partitions: int = 6
    partials_partitions: int = 3
    tier1_workers: int | None = None  # default: as many as the rate needs
    leaderboard: bool = True  # all-time cells also update a sorted set per channel (batched per apply)
    split_threshold_eps: float = 20_000.0  # a key above this rate is split by the writers
    partition_budget_eps: float = 20_000.0  # what one sub-key may carry
    dedup_horizon_s: float = 600.0  # how long tier 1 remembers an event id (0: no deduplication)
    id_share: float = 1.0  # share of events with an id (the SDK and the gateway give every event one)
    max_cells: int = 200_000  # a window's cell limit (the topology's max_cells)
    redis_shards: int = 1  # Redis Cluster masters (1: one Redis)

    def __post_init__(self) -> None:
        if self.events_per_s <= 0 or self.keys <= 0 or self.flush_interval_s <= 0:
            raise ValueError("rate, keys and flush interval must be positive")
        if not 0 <= self.hot_share < 1:
            raise ValueError("hot_share must be in [0, 1)")
        if self.redis_shards < 1:
            raise ValueError("redis_shards must be at least 1")
        if self.dedup_horizon_s < 0 or not 0 <= self.id_share <= 1:
            raise ValueError("the dedup horizon must not be negative, the id share within [0, 1]")


@dataclass
class Plan:
    events_per_s: float
    cells_per_window: float
    partials_per_s: float
    applies_per_s: float
    redis_commands_per_s: float
    events_per_partial: float
    events_per_redis_command: float
    # deduplication at tier 1: ids held in memory (a horizon and at most one bucket more), their bytes,
    # and the changelog Kafka keeps for rebuilding them (no Redis write per event)
    dedup_ids: float = 0.0
    dedup_bytes_per_id: float = 0.0
    dedup_memory_bytes: float = 0.0
    dedup_changelog_bytes: float = 0.0
    # a tier-1 worker's memory bound: the process, its open cells (a window, at most max_cells) and
    # its share of the dedup state
    tier1_memory_bytes: float = 0.0
    hot_keys: list[tuple[str, float, int]] = field(default_factory=list)  # (key, events/s, k)
    redis_commands_per_s_per_shard: list[float] = field(default_factory=list)  # per master, by its slots
    workers: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _key_rates(w: Workload) -> list[float]:
    """Events/s of every key: the Zipf background, then the viral key (if any) last."""
    weights = zipf_weights(w.keys, w.zipf_s)
    total = sum(weights)
    background = w.events_per_s * (1 - w.hot_share)
    rates = [background * x / total for x in weights]
    if w.hot_share:
        rates.append(w.events_per_s * w.hot_share)
    return rates


def _distinct(rates: list[float], span_s: float) -> float:
    """Expected number of keys seen at least once in `span_s`."""
    return sum(-math.expm1(-r * span_s) for r in rates)


def split_factor(rate: float, w: Workload) -> int:
    if rate <= w.split_threshold_eps:
        return 1
    return min(w.events_partitions, math.ceil(rate / w.partition_budget_eps))


def apply_commands(cells: float, channels: int, ranges: float, leaderboard: bool) -> float:
    """Redis commands of one root apply of `cells` cells over `channels` channels (`ranges` partials
    partitions, 1 since each root partition applies on its own): what `core.redis_layout.plan_apply`
    counts, each "per 1,000" of fields or members."""
    channels_per_apply = channels * -math.expm1(-cells / channels)
    per_thousand = channels_per_apply + cells / 1000  # chunks of 1,000 fields over the channels' hashes
    # each channel's hash: read (HMGET) before the first write, written with one HSET (counts are
    # added in the script)
    hashes = 2 * per_thousand
    # a leaderboard per channel: a ZCARD (read first), a ZADD per 1,000 members
    boards = (channels_per_apply + per_thousand) if leaderboard else 0.0
    # positions, sequence numbers and counters: an HMGET and an HSET each, per 1,000 entries
    fixed = 2 * (math.ceil(ranges / 1000) + math.ceil(channels_per_apply / 1000) + 1)
    return hashes + boards + fixed


@dataclass(frozen=True)
class Drain:
    """A backlog of `per_key` events for each of `keys` keys, each key's events together."""

    events_per_s: float  # what one tier-1 worker and one root drain, end to end
    cells: float
    applies: float
    redis_commands_per_cell: float


def drain(
    keys: int,
    per_key: int,
    *,
    channels: int = 20,
    flush_interval_s: float = 0.25,
    max_cells: int = 200_000,
    partials_partitions: int = 3,
    leaderboard: bool = True,
) -> Drain:
    """The high-cardinality case: how fast a backlog drains, and what each cell costs Redis.

    Every process (tier 1, the root, the broker, Redis) shares the reference machine's 2 cores,
    so their costs add up: DRAIN_US_PER_EVENT for each event (fetching, parsing, folding it),
    DRAIN_US_PER_CELL for each cell (a partial's entry, the root's merge and apply, Redis's
    command) and DRAIN_LATENCY_S once per backlog. A window holds what arrives in the flush interval
    (at most `max_cells` cells); the root applies each window on its own when it keeps up, and when
    cells arrive faster than ROOT_US_PER_CELL lets it apply them, each apply takes the windows that
    arrived during the last. The cells per apply follow the events/s: an error there comes back
    inverted in the commands per cell.
    """
    events = float(keys * per_key)
    per_event_us = DRAIN_US_PER_EVENT + DRAIN_US_PER_CELL / per_key
    eps = events / (events * per_event_us / 1e6 + DRAIN_LATENCY_S)
    cells = float(keys)  # a key's events are together: one cell each (rarely two, cut by a window)
    # a window's cells go to the root partitions by key, each applied on its own (one hash tag)
    arrived = eps * flush_interval_s / per_key  # a window's cells
    lag = eps / per_key * ROOT_US_PER_CELL / 1e6  # windows arriving while the root applies one
    if lag > 1:  # the root cannot keep up: each apply takes what arrived during the last
        arrived *= lag
    cells_per_apply = min(float(max_cells), arrived, cells) / partials_partitions
    applies = cells / cells_per_apply
    commands = applies * apply_commands(cells_per_apply, channels, 1, leaderboard)
    return Drain(eps, cells, applies, commands / cells)


def plan(w: Workload) -> Plan:
    rates = _key_rates(w)
    # hot keys are spread over k sub-keys, each landing on its own source partition
    expanded: list[float] = []
    hot: list[tuple[str, float, int]] = []
    for i, r in enumerate(rates):
        k = split_factor(r, w)
        if k > 1:
            name = "viral" if w.hot_share and i == len(rates) - 1 else f"key #{i + 1}"
            hot.append((name, r, k))
        expanded.extend([r / k] * k)
    window = w.flush_interval_s
    cells = _distinct(expanded, window)
    # cells of one source partition spread over the root partitions by hash
    per_source = cells / w.events_partitions
    roots = w.partials_partitions
    busy_sources = w.events_partitions * -math.expm1(-w.events_per_s * window / w.events_partitions)
    partials_per_window = busy_sources * roots * -math.expm1(-per_source / roots) if per_source else 0.0
    partials_per_s = partials_per_window / window
    tier1 = w.tier1_workers or max(1, math.ceil(w.events_per_s / TIER1_EVENTS_PER_WORKER))
    # A root that keeps up applies each tier-1 worker's flush on its own, one apply per root partition
    # (its keys share a hash tag): the window's cells of that worker's partitions that hash there.
    # A root that falls behind merges several flushes per apply and so writes less: an upper bound.
    applies_per_s = min(partials_per_s, tier1 * roots / window) if partials_per_s else 0.0
    if applies_per_s:
        cells_per_apply = _distinct(rates, window) / (applies_per_s * window)
        commands_per_s = applies_per_s * apply_commands(cells_per_apply, w.channels, 1, w.leaderboard)
    else:
        commands_per_s = 0.0
    # each root partition's keys live on one shard (its hash tag's slot); the tags spread the
    # partitions evenly over masters holding equal slot ranges (core/redis_layout.partition_tag)
    shards = [0.0] * w.redis_shards
    for p in range(roots):
        shards[(2 * p + 1) * w.redis_shards // (2 * roots)] += commands_per_s / roots
    merge_workers = max(1, min(roots, math.ceil(commands_per_s / MERGE_CELLS_PER_WORKER)))
    result = Plan(
        events_per_s=w.events_per_s,
        cells_per_window=cells,
        partials_per_s=partials_per_s,
        applies_per_s=applies_per_s,
        redis_commands_per_s=commands_per_s,
        events_per_partial=w.events_per_s / partials_per_s if partials_per_s else 0.0,
        events_per_redis_command=w.events_per_s / commands_per_s if commands_per_s else 0.0,
        hot_keys=hot,
        workers={"coalesce": tier1, "merge": merge_workers},
        redis_commands_per_s_per_shard=shards,
    )
    if w.dedup_horizon_s and w.id_share:
        ids_per_s = w.events_per_s * w.id_share
        result.dedup_ids = ids_per_s * w.dedup_horizon_s * (1 + 1 / dedup.BUCKETS)
        result.dedup_bytes_per_id = dedup.bytes_per_id()
        result.dedup_memory_bytes = result.dedup_ids * result.dedup_bytes_per_id
        kept_s = dedup.changelog_retention_ms(int(w.dedup_horizon_s * 1000)) / 1000
        result.dedup_changelog_bytes = ids_per_s * kept_s * dedup.BYTES_PER_ID
    open_cells = min(float(w.max_cells), cells / tier1)  # a worker's share of a window's cells
    result.tier1_memory_bytes = coalescer.tier1_memory_bound(0) + (
        coalescer.BYTES_PER_OPEN_CELL * open_cells + result.dedup_memory_bytes / tier1
    )
    events_per_window = w.events_per_s * window
    if cells > 0.5 * events_per_window:
        result.warnings.append(
            f"most keys see about one event per {window * 1000:.0f} ms window "
            f"({events_per_window / cells:.2f} events per cell): the window saves almost no writes; "
            "a longer flush interval (or a coarser key) is what would help"
        )
    if tier1 > w.events_partitions:
        result.warnings.append(
            f"{tier1} tier-1 workers are needed but the events topic has {w.events_partitions} partitions: "
            "add partitions"
        )
    return result
