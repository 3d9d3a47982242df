"""The broadcast core: coalescing, pacing, seq order and resume, slow viewers, comment sampling."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.fanout import (
    Comment,
    Fanout,
    FanoutConfig,
    Group,
    Outgoing,
    Snapshot,
    parse_channels,
    parse_since,
    sample_comments,
    top_liked,
    valid_channel,
)
from pipeline.core.model import ChannelUpdate

CH = "video-1"
ALWAYS: Callable[[str], bool] = lambda v: True  # noqa: E731
NEVER: Callable[[str], bool] = lambda v: False  # noqa: E731


def upd(seq: int, **values: float) -> ChannelUpdate:
    return ChannelUpdate(CH, seq, 0, [("likes", k, v) for k, v in values.items()])


def body(out: Outgoing) -> dict[str, Any]:
    msg: dict[str, Any] = orjson.loads(out.data)
    return msg


def join(
    f: Fanout[str],
    viewer: str,
    now: float,
    seq: int = 0,
    values: dict[str, float] | None = None,
    since: int | None = None,
    channel: str = CH,
) -> list[Group[str]]:
    f.subscribe(viewer, channel, since, now)
    out = []
    for request in f.take_snapshot_requests():
        snap = Snapshot(request.channel, seq, [("likes", k, v) for k, v in (values or {}).items()])
        out += f.on_snapshot(request, snap, now)
    return out


def sent_to(sends: list[Group[str]], viewer: str, kind: str | None = None) -> list[dict[str, Any]]:
    """What `viewer` gets, in order."""
    return [body(o) for o, viewers in sends if viewer in viewers and (kind is None or o.type == kind)]


class ViewerModel:
    """What a viewer's page does with what it receives: keeps the latest value of each key."""

    def __init__(self) -> None:
        self.seq = -1
        self.values: dict[str, float] = {}

    def take(self, messages: list[dict[str, Any]]) -> None:
        for m in messages:
            if m["type"] == "snapshot":
                assert m["seq"] > self.seq, "a snapshot steps backwards"
                self.seq = m["seq"]
                self.values = {k: v for _, k, v in m["values"]}
            elif m["type"] == "update":
                assert m["seq"] > self.seq, "an update steps backwards"
                self.seq = m["seq"]
                self.values.update({k: v for _, k, v in m["values"]})


def test_parse() -> None:
    assert parse_channels("a,b,,a") == ["a", "b"]
    assert parse_channels(None) == []
    assert parse_since("a:12,b:30") == {"a": 12, "b": 30}
    assert parse_since("x:y:5") == {"x:y": 5}
    for bad in ("a", "a:b", ":3"):
        with pytest.raises(ValueError):
            parse_since(bad)


def test_snapshot_then_only_changed_keys_with_the_latest_value() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(push_rate=4))
    sends = join(f, "v", 0.0, seq=3, values={"a": 1, "b": 2})
    assert sent_to(sends, "v") == [
        {
            "type": "snapshot",
            "channel": CH,
            "seq": 3,
            "values": [["likes", "a", 1], ["likes", "b", 2]],
            "top": [],
        }
    ]
    f.on_update(upd(4, a=5), 0.01)
    f.on_update(upd(5, c=1), 0.02)
    f.on_update(upd(6, a=7), 0.03)
    got = sent_to(f.collect(0.05, ALWAYS).sends, "v")
    assert got == [
        {"type": "update", "channel": CH, "seq": 6, "values": [["likes", "c", 1], ["likes", "a", 7]]}
    ]
    assert f.collect(0.5, ALWAYS).sends == []  # nothing new


def test_only_subscribed_channels_reach_a_viewer() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    join(f, "v", 0.0)
    f.on_update(ChannelUpdate("other", 1, 0, [("likes", "x", 1)]), 0.1)
    f.on_update(upd(1, a=1), 0.1)
    assert {body(o)["channel"] for o, _ in f.collect(0.2, ALWAYS).sends} == {CH}


def test_pushes_are_paced_and_fast_viewers_share_one_message() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(push_rate=4))
    for v in ("v1", "v2", "v3"):
        join(f, v, 0.0)
    pushes: list[float] = []
    now = 0.0
    for seq in range(1, 201):  # 100 updates per second for 2 s
        now = seq * 0.01
        f.on_update(upd(seq, a=seq), now)
        due = f.next_due()
        assert due is not None
        if due <= now:
            sends = f.collect(now, ALWAYS).sends
            assert len(sends) == 1  # one message, encoded once, for everyone
            assert sorted(sends[0][1]) == ["v1", "v2", "v3"]
            pushes.append(now)
    assert len(pushes) <= 2 * 4 + 1
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(pushes))


def test_seq_never_steps_back_and_stale_updates_are_dropped() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    join(f, "v", 0.0, seq=10)
    f.on_update(upd(9, a=1), 0.1)  # already in the snapshot
    f.on_update(upd(10, a=1), 0.1)
    assert f.collect(1.0, ALWAYS).sends == []
    f.on_update(upd(11, a=2), 1.1)
    f.on_update(upd(11, a=2), 1.1)  # a duplicate
    assert [m["seq"] for m in sent_to(f.collect(2.0, ALWAYS).sends, "v")] == [11]
    assert f.stale_updates == 3


def test_resume_with_since() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    assert (
        sent_to(join(f, "fresh", 0.0, seq=20, values={"a": 3}, since=12), "fresh", "snapshot")[0]["seq"] == 20
    )
    g: Fanout[str] = Fanout(FanoutConfig())
    assert join(g, "same", 0.0, seq=20, values={"a": 3}, since=20) == []  # it has all of it already
    g.on_update(upd(21, a=4), 0.1)
    assert sent_to(g.collect(0.5, ALWAYS).sends, "same") == [
        {"type": "update", "channel": CH, "seq": 21, "values": [["likes", "a", 4]]}
    ]


def test_each_root_partition_numbers_its_updates_and_the_channel_seq_is_their_sum() -> None:
    """Layout 2: each root partition keeps its own seq of a channel (their keys are disjoint); viewers see
    the sum, which rises by one per update applied; a gap waits only for its own partition."""
    f: Fanout[str] = Fanout(FanoutConfig(reorder_wait_s=1.0))
    f.subscribe("v", CH, None, 0.0)
    (request,) = f.take_snapshot_requests()
    snap = Snapshot(CH, 5, [("likes", "a", 1), ("likes", "b", 2)], parts={0: 2, 1: 3})
    assert [m["seq"] for m in sent_to(f.on_snapshot(request, snap, 0.0), "v")] == [5]
    f.on_update(ChannelUpdate(CH, 4, 0, [("likes", "b", 3)], root=1), 0.1)  # partition 1's next
    f.on_update(ChannelUpdate(CH, 4, 0, [("likes", "a", 5)], root=0), 0.1)  # partition 0 misses 3: held
    f.on_update(ChannelUpdate(CH, 3, 0, [("likes", "b", 9)], root=1), 0.1)  # partition 1 already has 3
    assert sent_to(f.collect(0.2, ALWAYS).sends, "v") == [
        {"type": "update", "channel": CH, "seq": 6, "values": [["likes", "b", 3]]}
    ]
    f.on_update(ChannelUpdate(CH, 3, 0, [("likes", "a", 4)], root=0), 0.3)
    assert sent_to(f.collect(0.6, ALWAYS).sends, "v") == [
        {"type": "update", "channel": CH, "seq": 8, "values": [["likes", "a", 5]]}
    ]
    assert f.channel_seq(CH) == 8 and f.stale_updates == 1
    # a snapshot behind what the node applied in a partition (read before an update it has) is read again
    f.subscribe("w", CH, None, 0.7)
    (request,) = f.take_snapshot_requests()
    assert f.on_snapshot(request, Snapshot(CH, 9, [("likes", "a", 4)], parts={0: 3, 1: 6}), 0.7) == []
    (request,) = f.take_snapshot_requests()
    snap = Snapshot(CH, 8, [("likes", "a", 5), ("likes", "b", 3)], parts={0: 4, 1: 4})
    sends = f.on_snapshot(request, snap, 0.8)
    assert [m["seq"] for m in sent_to(sends, "w")] == [8] and sent_to(sends, "v") == []
    # one ahead in a partition: every viewer gets it (the node never saw those updates), at the new sum
    f.subscribe("x", CH, None, 0.9)
    (request,) = f.take_snapshot_requests()
    snap = Snapshot(CH, 10, [("likes", "a", 5), ("likes", "b", 7)], parts={0: 4, 1: 6})
    sends = f.on_snapshot(request, snap, 0.9)
    assert {v for o, vs in sends if o.type == "snapshot" for v in vs} == {"v", "w", "x"}
    assert f.channel_seq(CH) == 10
    f.on_update(ChannelUpdate(CH, 7, 0, [("likes", "b", 8)], root=1), 1.0)
    assert [m["seq"] for m in sent_to(f.collect(1.5, ALWAYS).sends, "w")] == [11]


def test_updates_before_the_first_snapshot_are_held_and_those_it_covers_dropped() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    f.subscribe("v", CH, None, 0.0)
    (request,) = f.take_snapshot_requests()
    f.on_update(upd(5, a=5), 0.01)
    f.on_update(upd(6, b=1), 0.02)
    f.on_update(upd(7, a=6), 0.03)
    sends = f.on_snapshot(request, Snapshot(CH, 6, [("likes", "a", 5), ("likes", "b", 1)]), 0.05)
    assert [m["seq"] for m in sent_to(sends, "v")] == [6]
    assert sent_to(f.collect(0.1, ALWAYS).sends, "v") == [
        {"type": "update", "channel": CH, "seq": 7, "values": [["likes", "a", 6]]}
    ]


def test_a_late_seq_is_waited_for_and_applied_in_order() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(reorder_wait_s=1.0))
    join(f, "v", 0.0, seq=1)
    f.on_update(upd(3, b=1), 0.1)  # 2 is late
    assert f.collect(0.2, ALWAYS).sends == []
    f.on_update(upd(2, a=1), 0.3)
    assert sent_to(f.collect(0.4, ALWAYS).sends, "v") == [
        {"type": "update", "channel": CH, "seq": 3, "values": [["likes", "a", 1], ["likes", "b", 1]]}
    ]
    assert f.take_snapshot_requests() == []


def test_a_seq_that_never_comes_gets_everyone_a_fresh_snapshot() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(reorder_wait_s=1.0))
    join(f, "v1", 0.0, seq=1)
    join(f, "v2", 0.0, seq=1)
    f.on_update(upd(3, b=1), 0.1)  # 2 was lost
    assert f.next_due() == pytest.approx(1.1)
    assert f.collect(1.2, ALWAYS).sends == []
    (request,) = f.take_snapshot_requests()
    f.on_update(upd(5, c=1), 1.3)
    sends = f.on_snapshot(request, Snapshot(CH, 4, [("likes", "a", 1), ("likes", "b", 1)]), 1.4)
    assert {v for o, vs in sends if o.type == "snapshot" for v in vs} == {"v1", "v2"}
    assert sent_to(f.collect(1.5, ALWAYS).sends, "v1") == [
        {"type": "update", "channel": CH, "seq": 5, "values": [["likes", "c", 1]]}
    ]
    assert f.resyncs == 1


def test_a_blocked_viewer_skips_values_and_is_disconnected_while_a_fast_one_keeps_up() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(push_rate=4, max_blocked_s=2.0))
    join(f, "slow", 0.0)
    join(f, "fast", 0.0)
    writable = {"slow": False, "fast": True}
    fast_seqs: list[int] = []
    dropped: list[str] = []
    for step in range(1, 41):
        now = step * 0.25
        f.on_update(upd(step, a=step, b=step), now)
        got = f.collect(now, writable.__getitem__)
        fast_seqs += [m["seq"] for m in sent_to(got.sends, "fast")]
        assert sent_to(got.sends, "slow") == []
        dropped += got.disconnect
        if step == 4:
            assert f.viewer_state("slow") == {CH: 0}  # one int, however many updates it missed
    assert dropped == ["slow"]
    assert fast_seqs == list(range(1, 41))
    assert f.viewers == 1


def test_a_viewer_that_catches_up_gets_only_the_latest_values() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(push_rate=4, max_blocked_s=100))
    join(f, "v", 0.0)
    for seq in range(1, 1001):
        f.on_update(upd(seq, **{f"k{seq % 5}": seq}), seq * 0.001)
        f.collect(seq * 0.001 + 1, NEVER)
    assert f.channel_entries(CH) == 5
    got = sent_to(f.collect(1000.0, ALWAYS).sends, "v")
    assert got == [
        {
            "type": "update",
            "channel": CH,
            "seq": 1000,
            "values": [["likes", f"k{s % 5}", s] for s in range(996, 1001)],
        }
    ]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_property_every_viewer_converges_with_bounded_state(data: st.DataObject) -> None:
    """Random updates, arrival slightly out of order, viewers that block at random, a late joiner:
    every viewer's seq only grows, its state is one int per channel, the channel holds at most one
    entry per key, and once writable every viewer holds exactly the final totals."""
    keys = ["a", "b", "c", "d", "e"]
    n = data.draw(st.integers(1, 50), label="updates")
    truth: list[dict[str, float]] = [{}]
    updates = []
    for seq in range(1, n + 1):
        changed = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=5, unique=True))
        state = dict(truth[-1])
        for k in changed:
            state[k] = state.get(k, 0) + data.draw(st.integers(1, 5))
        truth.append(state)
        updates.append(ChannelUpdate(CH, seq, 0, [("likes", k, state[k]) for k in changed]))
    order = list(range(n))
    for i in range(n - 1):  # neighbours swap: two mergers racing
        if data.draw(st.booleans()):
            order[i], order[i + 1] = order[i + 1], order[i]
    f: Fanout[str] = Fanout(FanoutConfig(push_rate=4, max_blocked_s=1e9, reorder_wait_s=1e9))
    models = {"v1": ViewerModel(), "v2": ViewerModel()}
    models["v1"].take(sent_to(join(f, "v1", 0.0), "v1"))
    joins_at = data.draw(st.integers(0, n - 1), label="late joiner")
    arrived: list[int] = []
    now = 0.0
    for step, i in enumerate(order):
        now += data.draw(st.sampled_from([0.01, 0.1, 0.3]))
        f.on_update(updates[i], now)
        arrived.append(i + 1)
        if step == joins_at:  # Redis is at least as far as anything published
            seq = max(arrived)
            # a snapshot ahead of what the node applied goes to every viewer (the node never gets the
            # updates it covers): what the join sends is delivered to whom it names
            joined = join(f, "v2", now, seq=seq, values=truth[seq])
            for name, model in models.items():
                model.take(sent_to(joined, name))
        blocked = data.draw(st.sets(st.sampled_from(["v1", "v2"])))
        got = f.collect(now, lambda v, blocked=blocked: v not in blocked)  # type: ignore[misc]
        for name, model in models.items():
            model.take(sent_to(got.sends, name))
            assert len(f.viewer_state(name)) <= 1
        assert f.channel_entries(CH) <= len(keys)
    got = f.collect(now + 10, ALWAYS)
    for name, model in models.items():
        model.take(sent_to(got.sends, name))
        assert model.values == truth[n], name
        assert model.seq == n
        assert f.viewer_state(name) == {CH: n}


def test_comments_reach_viewers_with_likes_and_are_resent_when_likes_change() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(push_rate=4))
    join(f, "v", 0.0, seq=0)
    f.on_update(upd(1, **{"comment-1": 2}), 0.05)  # a like that got ahead of its comment
    event = {"type": "comment", "key": "comment-1", "channel": CH, "user": "u1", "text": "hi", "id": "e1"}
    assert f.on_comment(orjson.dumps(event), 0.1)
    got = sent_to(f.collect(0.3, ALWAYS).sends, "v", "comments")
    assert got == [
        {
            "type": "comments",
            "channel": CH,
            "items": [{"id": "e1", "key": "comment-1", "user": "u1", "text": "hi", "ts": None, "likes": 2}],
        }
    ]
    f.on_update(upd(2, **{"comment-1": 5}), 0.4)
    got = sent_to(f.collect(0.6, ALWAYS).sends, "v", "comments")
    assert [i["likes"] for m in got for i in m["items"]] == [5]
    assert not f.on_comment(b"{not json", 0.7)


def test_a_new_viewer_gets_recent_comments_after_its_snapshot() -> None:
    f: Fanout[str] = Fanout(FanoutConfig(initial_comments=2))
    join(f, "first", 0.0)
    for i in range(5):
        f.on_comment(orjson.dumps({"type": "comment", "key": f"c{i}", "channel": CH}), 0.1)
    sends = join(f, "second", 0.2, seq=0)
    got = sent_to(sends, "second")
    assert [m["type"] for m in got] == ["snapshot", "comments"]
    assert [i["key"] for i in got[1]["items"]] == ["c3", "c4"]


def test_a_busy_channel_is_sampled_to_the_comment_rate_keeping_the_top_liked() -> None:
    f: Fanout[str] = Fanout(
        FanoutConfig(push_rate=4, comment_rate=10, keep_top_liked=2), rng=random.Random(1)
    )
    join(f, "v", 0.0)
    f.on_update(upd(1, c7=50, c3=40), 0.0)  # the two most liked comments
    received: list[str] = []
    now = 0.0
    for i in range(400):  # 100 comments/s for 4 s
        now = i * 0.01
        f.on_comment(orjson.dumps({"type": "comment", "key": f"c{i}", "channel": CH}), now)
        if f.next_due() is not None and f.next_due() <= now:  # type: ignore[operator]
            received += [
                it["key"] for m in sent_to(f.collect(now, ALWAYS).sends, "v", "comments") for it in m["items"]
            ]
    assert {"c3", "c7"} <= set(received)
    assert len(received) <= 10 * 4 + 10  # the rate, plus one second of burst


@given(
    st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=0, max_size=40),
    st.integers(0, 10),
    st.integers(0, 5),
)
def test_property_sampling_keeps_the_top_liked(
    likes: list[tuple[int, bool]], budget: int, top_n: int
) -> None:
    recent = [Comment(f"id{i}", f"c{i}", None, None, None, n, i) for i, (n, _) in enumerate(likes)]
    candidates = [c for c, (_, new) in zip(recent, likes, strict=True) if new]
    keep = top_liked(recent, top_n)
    chosen = sample_comments(candidates, keep, budget, random.Random(0))
    keys = [c.key for c in chosen]
    assert set(keys) <= {c.key for c in candidates}
    assert {c.key for c in candidates if c.key in keep} <= set(keys)
    assert len(chosen) <= max(budget, len([c for c in candidates if c.key in keep]))
    assert len(chosen) >= min(budget, len(candidates))
    assert [c.order for c in chosen] == sorted(c.order for c in chosen)
    assert len(keep) <= top_n and all(c.likes > 0 for c in recent if c.key in keep)


def test_the_last_viewer_leaving_forgets_the_channel() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    join(f, "v1", 0.0)
    join(f, "v2", 0.0)
    f.on_update(upd(1, a=1), 0.1)
    f.unsubscribe("v1", CH)
    assert f.channels == 1
    f.remove("v2")
    assert (f.channels, f.viewers, f.channel_entries(CH)) == (0, 1, 0)
    f.on_update(upd(2, a=2), 0.2)  # nobody watches: nothing kept
    assert f.channel_entries(CH) == 0 and f.next_due() is None


def test_a_snapshot_for_a_forgotten_channel_is_ignored() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    f.subscribe("v", CH, None, 0.0)
    (old,) = f.take_snapshot_requests()
    f.remove("v")
    f.subscribe("w", CH, None, 0.1)
    (new,) = f.take_snapshot_requests()
    assert not f.wants(old) and f.wants(new)
    assert f.on_snapshot(old, Snapshot(CH, 5), 0.2) == []
    assert [m["type"] for m in sent_to(f.on_snapshot(new, Snapshot(CH, 6), 0.3), "w")] == ["snapshot"]


def test_a_send_budget_leaves_the_remaining_channels_due_in_order() -> None:
    f: Fanout[str] = Fanout(FanoutConfig())
    for ch in ("x", "y", "z"):
        for i in range(3):
            join(f, f"{ch}{i}", 0.0, channel=ch)
        f.on_update(ChannelUpdate(ch, 1, 0, [("likes", "k", 1)]), 0.1)
    first = f.collect(0.2, ALWAYS, max_sends=4)
    assert [o.channel for o, _ in first.sends] == ["x", "y"]  # 3 + 3 >= 4: stop after the second
    assert f.next_due() is not None and f.next_due() <= 0.2  # type: ignore[operator]
    assert [o.channel for o, _ in f.collect(0.2, ALWAYS, max_sends=4).sends] == ["z"]


def test_channel_names_that_would_break_the_framing_are_refused() -> None:
    assert valid_channel("video-1") and valid_channel("x" * 256)
    assert not any(valid_channel(c) for c in ("", "x" * 257, "a\nb", "a\rb", "a,b"))
