"""The Redis key layout and the plan of one atomic apply."""

from __future__ import annotations

import binascii
import re
import zlib
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.merger import UNKNOWN, MergedBatch
from pipeline.core.redis_layout import (
    OP_COUNT,
    OP_DISTINCT,
    OP_MAX,
    OP_MIN,
    OP_SUM,
    SLOTS,
    agg_key,
    key_tag,
    partition_tag,
    plan_apply,
    positions_key,
    root_partition,
    seq_key,
    slot,
    stats_key,
    top_key,
    uniq_key,
)
from pipeline.topology import Rollup, count, distinct_users, every, maximum, minimum, sum_of, topology, total

TOPO = topology(
    "shop",
    metrics=[
        count("likes", "like", total(), every(60, 3600), leaderboard=10),
        sum_of("amount", "like", total(), every(3600, 86400)),
        minimum("lo", "like"),
        maximum("hi", "like", total(), every(60, 120)),
        distinct_users("viewers", "like", total(), every(60, 7200)),
        count("plain", "like"),
        sum_of("spend", "like", total(), leaderboard=3),
    ],
    priorities={"like": 0},
)


T0 = partition_tag("shop", 0, 3)


def plan(cells: dict[Any, Any], ranges: dict[int, tuple[int, int]] | None = None, **counters: int) -> Any:
    batch = MergedBatch(cells=cells, ranges={0: (0, 0)} if ranges is None else ranges, **counters)
    return plan_apply(TOPO, batch)


def payload(p: Any) -> dict[str, Any]:
    return orjson.loads(p.payload)


# --------------------------------------------------------------------------- key names


def test_key_names_follow_the_documented_layout() -> None:
    t = partition_tag("shop", 2, 3)
    assert re.fullmatch(r"shop:\{shop:2:\d+\}", t)
    assert agg_key(t, "likes", "total", "v1") == f"{t}:agg:likes:total:v1"
    assert agg_key(t, "likes", "60:120", "v:1") == f"{t}:agg:likes:60:120:v:1"
    assert uniq_key(t, "viewers", "total", "v1", "c1") == f'{t}:uniq:viewers:total:["v1","c1"]'
    assert uniq_key(t, "viewers", "60:0", 'a"b', "ü") == f'{t}:uniq:viewers:60:0:["a\\"b","ü"]'
    assert top_key(t, "likes", "v1") == f"{t}:top:likes:v1"
    assert positions_key(t) == f"{t}:pos:merge"
    assert stats_key(t) == f"{t}:stats"
    assert seq_key(t) == f"{t}:seq"
    assert key_tag(TOPO, "c1") == partition_tag("shop", root_partition("c1", 3), 3)


def test_hash_slots_are_redis_clusters() -> None:
    assert slot("123456789") == 12739  # CRC16-XMODEM of the Redis Cluster specification's example
    assert slot("a{user1000}.following") == slot("b{user1000}.followers") == slot("user1000")
    assert slot("foo{}{bar}") == binascii.crc_hqx(b"foo{}{bar}", 0) % SLOTS  # an empty tag: the whole key
    assert slot("foo{{bar}}zap") == slot("{bar")


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 6, 12])
def test_partition_tags_spread_over_equal_slot_ranges(parts: int) -> None:
    """Partition p's slot is in the p-th of `parts` equal ranges: masters holding equal ranges (3 masters,
    3 or 6 or 12 partitions) each get the same number of partitions, whatever the topology's name."""
    for name in ("shop", "live_likes", "t0123456789"):
        slots = [slot(partition_tag(name, p, parts)) for p in range(parts)]
        assert [s * parts // SLOTS for s in slots] == list(range(parts))
        if parts % 3 == 0:
            masters = Counter(s * 3 // SLOTS for s in slots)
            assert set(masters.values()) == {parts // 3}
    with pytest.raises(ValueError):
        partition_tag("shop", 3, 3)


def test_every_key_starts_with_the_topology_name_and_hashes_by_its_partition() -> None:
    for part in (0, 1, 2):
        t = partition_tag("t", part, 3)
        for key in (
            agg_key(t, "m", "total", "c{x}"),
            uniq_key(t, "m", "total", "{c}", "}k{"),
            top_key(t, "m", "c}"),
            positions_key(t),
            stats_key(t),
            seq_key(t),
        ):
            assert key.startswith("t:")
            assert slot(key) == slot(t)  # whatever braces the channel or key hold


@settings(max_examples=100)
@given(cells=st.lists(st.tuples(st.integers(0, 6), st.text(max_size=5), st.text(max_size=5)), min_size=1))
def test_every_key_of_an_apply_shares_its_partitions_hash_tag(cells: list[tuple[int, str, str]]) -> None:
    batch = {(m, ch, k, "total"): ({"u"} if m == 4 else 1) for m, ch, k in cells}
    body = payload(plan(batch, ranges={2: (0, 0)}, events=1))
    keys = [body["positions"], body["seq"], body["stats"]]
    keys += [op["key"] for op in body["ops"]] + [op["board"] for op in body["ops"] if "board" in op]
    assert {slot(k) for k in keys} == {slot(partition_tag("shop", 2, 3))}


def test_an_apply_covers_one_root_partition() -> None:
    with pytest.raises(ValueError, match="one root partition"):
        plan({}, ranges={0: (0, 0), 1: (0, 0)})


def test_root_partition_is_stable() -> None:
    assert [root_partition(k, 3) for k in ("comment-1", "c:2", "ü#{x}")] == [
        zlib.crc32(k.encode()) % 3 for k in ("comment-1", "c:2", "ü#{x}")
    ]


any_text = st.text(
    max_size=12, alphabet=st.one_of(st.sampled_from(':"[],\\\x00\xff'), st.characters(codec="utf-8"))
)
buckets = st.one_of(
    st.just("total"),
    st.builds(
        lambda size, ts: Rollup(size, 60).bucket(ts), st.sampled_from([1, 60, 3600]), st.integers(0, 10**13)
    ),
)
identities = st.one_of(
    st.tuples(st.just("agg"), st.sampled_from(["m", "m_2"]), buckets, any_text),
    st.tuples(st.just("uniq"), st.sampled_from(["m", "m_2"]), buckets, any_text, any_text),
    st.tuples(st.just("top"), st.sampled_from(["m", "m_2"]), any_text),
    st.tuples(st.sampled_from(["pos", "stats", "seq"])),
)


def redis_key(identity: tuple[Any, ...]) -> str:
    kind, *rest = identity
    t = partition_tag("t", 0, 3)
    if kind == "agg":
        return agg_key(t, *rest)
    if kind == "uniq":
        return uniq_key(t, *rest)
    if kind == "top":
        return top_key(t, *rest)
    return {"pos": positions_key, "stats": stats_key, "seq": seq_key}[kind](t)


@settings(max_examples=200)
@given(ids=st.lists(identities, min_size=2, max_size=12, unique=True))
def test_different_cells_never_share_a_key(ids: list[tuple[Any, ...]]) -> None:
    keys = [redis_key(i) for i in ids]
    assert len(set(keys)) == len(keys), dict(zip(keys, ids, strict=True))


@settings(max_examples=200)
@given(ch1=any_text, k1=any_text, ch2=any_text, k2=any_text, bucket=buckets)
def test_key_functions_never_collide_for_different_channel_key_pairs(
    ch1: str, k1: str, ch2: str, k2: str, bucket: str
) -> None:
    if (ch1, k1) != (ch2, k2):
        assert uniq_key("t", "m", bucket, ch1, k1) != uniq_key("t", "m", bucket, ch2, k2)
    if ch1 != ch2:
        # agg and top keys hold every key of a channel; the key is the hash field / member
        assert agg_key("t", "m", bucket, ch1) != agg_key("t", "m", bucket, ch2)
        assert top_key("t", "m", ch1) != top_key("t", "m", ch2)


# --------------------------------------------------------------------------- the apply plan


def test_plan_ops_keys_ttls_and_leaderboards() -> None:
    cells = {
        (0, "v1", "c1", "total"): 5,
        (0, "v1", "c1", "60:120"): 2,
        (1, "v2", "c1", "total"): 2.5,
        (1, "v2", "c1", "3600:0"): 1,
        (2, "v1", "c2", "total"): -3,
        (3, "v1", "c2", "60:0"): 7,
        (4, "v1", "c1", "total"): {"b", "a"},
        (4, "v1", "c1", "60:0"): {"a"},
        (5, "v4", "k", "total"): 1,
        (6, "v4", "k", "total"): 0.25,
        (0, "v1", "c3", "total"): 4,  # the same key as the first cell: one op, two fields
    }
    p = plan(cells)
    ops = payload(p)["ops"]
    assert len(p.reports) == len(cells)
    assert len(ops) == len(cells) - 1
    by_key = {op["key"]: op for op in ops}
    assert len(by_key) == len(ops)  # one op per key written
    assert by_key[f"{T0}:agg:likes:total:v1"] == {
        "kind": OP_COUNT,
        "key": f"{T0}:agg:likes:total:v1",
        "fields": ["c1", "c3"],
        "values": ["5", "4"],
        "ttl": 0,
        "board": f"{T0}:top:likes:v1",
        "board_size": 10,
    }
    assert by_key[f"{T0}:agg:likes:60:120:v1"] == {
        "kind": OP_COUNT,
        "key": f"{T0}:agg:likes:60:120:v1",
        "fields": ["c1"],
        "values": ["2"],
        "ttl": 3600,
    }
    assert by_key[f"{T0}:agg:amount:total:v2"] == {
        "kind": OP_SUM,
        "key": f"{T0}:agg:amount:total:v2",
        "fields": ["c1"],
        "values": ["2.5"],
        "ttl": 0,
    }
    assert by_key[f"{T0}:agg:amount:3600:0:v2"]["values"] == ["1.0"]
    assert by_key[f"{T0}:agg:amount:3600:0:v2"]["ttl"] == 86400
    assert by_key[f"{T0}:agg:lo:total:v1"] == {
        "kind": OP_MIN,
        "key": f"{T0}:agg:lo:total:v1",
        "fields": ["c2"],
        "values": ["-3.0"],
        "ttl": 0,
    }
    assert by_key[f"{T0}:agg:hi:60:0:v1"]["kind"] == OP_MAX
    assert by_key[f"{T0}:agg:hi:60:0:v1"]["ttl"] == 120
    assert by_key[f'{T0}:uniq:viewers:total:["v1","c1"]'] == {
        "kind": OP_DISTINCT,
        "key": f'{T0}:uniq:viewers:total:["v1","c1"]',
        "members": ["a", "b"],
        "ttl": 0,
    }
    assert by_key[f'{T0}:uniq:viewers:60:0:["v1","c1"]']["ttl"] == 7200
    assert by_key[f"{T0}:agg:plain:total:v4"]["values"] == ["1"]
    assert by_key[f"{T0}:agg:spend:total:v4"]["board"] == f"{T0}:top:spend:v4"
    assert by_key[f"{T0}:agg:spend:total:v4"]["board_size"] == 3
    # a TTL exactly for bucketed rollups, a leaderboard exactly for total cells of leaderboard metrics
    for o in ops:
        bucketed = ":total:" not in o["key"]
        assert (o["ttl"] > 0) == bucketed
        metric = o["key"][len(T0) + 1 :].split(":")[1]
        has_board = not bucketed and any(m.name == metric and m.leaderboard for m in TOPO.metrics)
        assert ("board" in o) == ("board_size" in o) == has_board
    # the reply answers a value per field of each op, in that order: the reports follow it
    fields = [(o["key"], f) for o in ops for f in o.get("fields", [""])]
    assert len(fields) == len(p.reports)
    for (key, field), report in zip(fields, p.reports, strict=True):
        if report is None:
            assert ":total:" not in key
        else:
            _channel, metric, cell_key = report
            assert key.startswith(
                f"{T0}:{'uniq' if metric == 'viewers' else 'agg'}:{metric}:total:"
            )
            assert field in ("", cell_key)


def test_reports_only_total_bucket_cells_in_op_order() -> None:
    cells = {
        (0, "v1", "c1", "60:0"): 1,
        (0, "v1", "c1", "total"): 1,
        (4, "v2", "c2", "total"): {"u"},
        (3, "v3", "c3", "60:60"): 4,
        (5, "v1", "c4", "total"): 2,
    }
    p = plan(cells)
    assert p.reports == [None, ("v1", "likes", "c1"), ("v2", "viewers", "c2"), None, ("v1", "plain", "c4")]
    # only channels with a total cell get a sequence number, once each, in first-seen order
    assert p.channels == ["v1", "v2"]
    assert payload(p)["channels"] == ["v1", "v2"]


def test_empty_distinct_cells_are_skipped() -> None:
    p = plan({(4, "v9", "c", "total"): set(), (4, "v9", "c", "60:0"): set(), (0, "v1", "c", "total"): 1})
    ops = payload(p)["ops"]
    assert [o["kind"] for o in ops] == [OP_COUNT]
    assert p.reports == [("v1", "likes", "c")]
    assert p.channels == ["v1"]


def test_payload_carries_ranges_positions_and_counters() -> None:
    p = plan({}, ranges={2: (10, 12)}, events=7, late_dropped=2, dead=1, partials=3, bad_partials=0)
    body = payload(p)
    assert p.partition == 2
    t2 = partition_tag("shop", 2, 3)
    assert body["positions"] == f"{t2}:pos:merge"
    assert body["stats"] == f"{t2}:stats"
    assert body["seq"] == f"{t2}:seq"
    assert body["ranges"] == [  # no expected position given
        {"partition": 2, "first": 10, "last": 12, "expected": UNKNOWN},
    ]
    assert body["ops"] == [] and body["channels"] == []
    counters = body["counters"]
    assert counters["events"] == 7
    assert counters["late_dropped"] == 2
    assert counters["dead_letters"] == 1
    assert counters["partials"] == 3
    assert counters["applies"] == 1
    assert "bad_partials" not in counters  # zero counters are not sent
    assert all(v for v in counters.values())


def test_values_are_transferred_exactly() -> None:
    p = plan({(0, "", "k", "total"): 10**15 + 1, (1, "", "k", "total"): 0.1 + 0.2})
    ops = payload(p)["ops"]
    assert ops[0]["values"] == [str(10**15 + 1)]
    assert float(ops[1]["values"][0]) == 0.1 + 0.2


def cost(cell: tuple[Any, ...], value: Any) -> int:
    """Commands one extra cell adds to a plan (its channel already has a total cell)."""
    base = {(5, "v", "base", "total"): 1}
    return plan({**base, cell: value}).commands - plan(base).commands


def test_command_count() -> None:
    # what an apply will change is read before its first write: an HMGET per hash (per 1,000 fields),
    # and written with one HSET per 1,000 fields: a count is added in the script, not by an HINCRBY
    assert cost((5, "v", "k", "total"), 1) == 0  # into the base cell's hash: read and written already
    assert cost((0, "v", "k", "60:0"), 1) == 3  # another hash: HMGET + HSET + EXPIRE
    assert cost((1, "v", "k", "total"), 1.5) == 2  # HMGET of its hash + HINCRBYFLOAT
    assert cost((2, "v", "k", "total"), 1.5) == 2  # HMGET + one HSET of what is smaller
    # a leaderboard's first cell adds its hash's HMGET and HSET and the sorted set's ZCARD and ZADD
    assert cost((0, "v", "k", "total"), 1) == 4
    board = {(0, "v", f"k{i}", "total"): i for i in range(1, 1001)}
    # an HMGET, an HSET, a ZCARD, a ZADD, the channel's seq (HMGET and HSET)
    assert plan(board).commands - plan({}).commands == 4 + 2
    board[(0, "v", "k1001", "total")] = 1
    assert plan(board).commands - plan({}).commands == 7 + 2  # a second HMGET, HSET and ZADD
    two = {(0, "v", "k", "60:0"): 1, (0, "v", "j", "60:0"): 1}
    assert (
        plan({(5, "v", "base", "total"): 1, **two}).commands - plan({(5, "v", "base", "total"): 1}).commands
        == 3
    )
    assert cost((4, "v", "k", "total"), {"u"}) == 3  # PFCOUNT (checked first) + PFADD + PFCOUNT
    assert cost((4, "v", "k", "60:0"), {"u"}) == 4  # + EXPIRE
    assert cost((4, "v", "k", "total"), set()) == 0  # skipped
    # a new channel costs its hash's HMGET and HSET; its sequence number rides in the seq hash's
    assert plan({(5, "a", "k", "total"): 1, (5, "b", "k", "total"): 1}).commands == (
        plan({(5, "a", "k", "total"): 1, (5, "a", "j", "total"): 1}).commands + 2
    )
    # the range's check and position write are one HMGET and one HSET, in any partition
    one = plan({}, ranges={0: (0, 0)}).commands
    assert plan({}, ranges={2: (3, 4)}).commands == one
    assert one > 0


@settings(max_examples=100)
@given(value=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15))
def test_float_args_round_trip(value: float) -> None:
    (op,) = payload(plan({(1, "", "k", "total"): value}))["ops"]
    assert float(op["values"][0]) == value
