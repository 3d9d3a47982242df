"""Comment history, sans-I/O: what the root appends from the feed, what a viewer gets back, and how a
broadcast node puts a channel's history before what it saw live (core/comment_history.py, Fanout)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.comment_history import (
    FeedRecord,
    HistoryPolicy,
    channel_tag,
    history_key,
    history_positions_key,
    parse,
    plan,
)
from pipeline.core.fanout import Fanout, FanoutConfig, Group, Snapshot

FEED = frozenset({"comment"})
CH = "video-1"


def record(offset: int, event: Any, partition: int = 0, ts: int = 1_000) -> FeedRecord:
    return FeedRecord(partition, offset, ts, orjson.dumps(event))


def comment(key: str, channel: str = CH, **extra: Any) -> dict[str, Any]:
    return {"type": "comment", "key": key, "channel": channel, **extra}


def test_a_batch_becomes_each_channels_appends_in_offset_order() -> None:
    records = [
        record(5, comment("c1", user="u1", text="hi", id="e1", ts=900)),
        record(6, comment("c2", channel="video-2")),
        record(7, {"type": "like", "key": "c1", "channel": CH}),  # not a feed type
        FeedRecord(0, 8, 1_000, b"{not json"),
        FeedRecord(0, 9, 1_000, None),
        record(10, comment("c3")),
    ]
    appends = plan(records, FEED)
    assert list(appends) == [CH, "video-2"]
    assert [(a.partition, a.offset) for a in appends[CH]] == [(0, 5), (0, 10)]
    first = orjson.loads(appends[CH][0].item)
    assert first == {"at": 1_000, "id": "e1", "key": "c1", "user": "u1", "text": "hi", "ts": 900}
    assert appends[CH][0].item.startswith(b'{"at":1000,')  # the script reads the age from there
    assert orjson.loads(appends[CH][1].item)["id"] == "c3"  # no id: the comment's key names it


def test_an_item_reads_back_as_a_viewers_comment_within_the_age() -> None:
    (a,) = plan([record(1, comment("c1", text="hello"), ts=10_000)], FEED)[CH]
    assert parse(a.item, 10_000 + 59_000, 60) == {
        "id": "c1",
        "key": "c1",
        "user": None,
        "text": "hello",
        "ts": None,
    }
    assert parse(a.item, 10_000 + 61_000, 60) is None  # too old
    assert parse(b"not json", 0, 60) is None
    assert parse(b'{"at": 1}', 1, 60) is None  # no key


@given(channel=st.text(max_size=40))
def test_a_channels_keys_share_one_hash_tag_whatever_it_holds(channel: str) -> None:
    tag = channel_tag("T", channel)
    for key in (history_key("T", channel), history_positions_key("T", channel)):
        assert key.startswith(tag + ":")
        inner = key[key.index("{") + 1 : key.index("}")]  # what Redis Cluster hashes
        assert inner == tag[tag.index("{") + 1 : -1]
    assert history_key("T", channel) != history_key("T", channel + "x")


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        HistoryPolicy(max_count=0)
    with pytest.raises(ValueError):
        HistoryPolicy(max_age_s=0)


# -- a broadcast node seeds a channel with its history --------------------------------------------


def items_to(groups: list[Group[str]], viewer: str) -> list[list[str]]:
    out = []
    for out_msg, viewers in groups:
        msg = orjson.loads(out_msg.data)
        if viewer in viewers and msg["type"] == "comments":
            out.append([i["key"] for i in msg["items"]])
    return out


def history(*keys: str) -> list[dict[str, Any]]:
    return [{"id": f"e-{k}", "key": k, "user": "u", "text": f"t {k}", "ts": 1} for k in keys]


def test_a_new_viewer_gets_the_last_20_of_the_history_on_a_node_that_saw_none() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(initial_comments=20), feed_types=FEED)
    f.subscribe("v", CH, None, 0.0)
    (request,) = f.take_snapshot_requests()
    assert f.seed_comments(request, history(*(f"c{i}" for i in range(30)))) == 30
    got = items_to(f.on_snapshot(request, Snapshot(CH, 3), 0.1), "v")
    assert got == [[f"c{i}" for i in range(10, 30)]]


def test_the_history_goes_before_what_the_node_saw_live_and_nothing_twice() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(initial_comments=5), feed_types=FEED)
    f.subscribe("v", CH, None, 0.0)
    (request,) = f.take_snapshot_requests()
    # while the snapshot is read, a comment arrives live; the history holds it too
    f.on_comment(orjson.dumps(comment("c3", id="e-c3")), 0.05)
    f.seed_comments(request, history("c1", "c2", "c3"))
    got = items_to(f.on_snapshot(request, Snapshot(CH, 1), 0.1), "v")
    assert got == [["c1", "c2", "c3"]]
    # a later viewer of the same channel: the same, from memory (no second seeding)
    f.subscribe("w", CH, None, 0.2)
    (again,) = f.take_snapshot_requests()
    assert f.seed_comments(again, history("c0")) == 0  # the channel is loaded: comments come live
    assert items_to(f.on_snapshot(again, Snapshot(CH, 1), 0.3), "w") == [["c1", "c2", "c3"]]


def test_a_seeded_comment_is_not_announced_again_to_viewers_who_got_it() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(initial_comments=5, push_rate=4), feed_types=FEED)
    f.subscribe("v", CH, None, 0.0)
    (request,) = f.take_snapshot_requests()
    f.seed_comments(request, history("c1"))
    f.on_snapshot(request, Snapshot(CH, 1), 0.1)
    f.on_comment(orjson.dumps(comment("c1", id="e-c1")), 0.2)  # the feed brings it as well
    f.on_comment(orjson.dumps(comment("c2", id="e-c2")), 0.2)
    assert items_to(f.collect(1.0, lambda v: True).sends, "v") == [["c2"]]
