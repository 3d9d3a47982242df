"""Tier 3's core: which message each viewer gets, and when. Sans-I/O.

The root publishes absolute totals, so a viewer never needs an intermediate
value, only the latest one of each key that changed since its last push. State
is therefore kept once per channel: the latest (seq, value) of every key that
changed, in the order of change. A viewer holds one integer per channel, the
seq it has; its next push is the keys whose change seq is above that, read from
the end of the channel's log. A viewer that cannot take a push (its socket is
backed up) is skipped and simply gets a larger delta later: nothing queues per
viewer, so memory follows the keys of the channels, never the number of
updates. Viewers at the same seq (all the fast ones) share one encoded message.

A channel's sequence starts at its first snapshot (read from Redis by the
runtime). Each root partition numbers its own applies of a channel (its keys are
disjoint from the other partitions', layout 2 in docs/CONTRACT.md); the
channel's seq, the one viewers see, is the sum over the partitions, so it rises
by one per update applied. Updates are applied in seq order within their
partition: a late one is held for `reorder_wait_s` (two mergers may publish a
channel's updates out of order); if the gap does not fill, every viewer of the
channel gets a fresh snapshot. A snapshot is read per partition; one behind
what the node already applied in some partition is read again.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from pipeline.core.model import MAX_KEY_CHARS, ChannelUpdate, InvalidEvent, check_event

V = TypeVar("V", bound=Hashable)
MAX_REREADS = 3  # a snapshot behind the node is read again this many times in a row, then taken
Key = tuple[str, str]  # (metric, key)


@dataclass(frozen=True, slots=True)
class FanoutConfig:
    push_rate: float = 4.0  # pushes per second per viewer and channel, at most
    max_blocked_s: float = 5.0  # a viewer whose socket stays backed up this long is disconnected
    comment_rate: float = 10.0  # comments per second a viewer gets at most (a sample beyond)
    keep_top_liked: int = 3  # comments among the channel's N most liked always get through
    recent_comments: int = 100  # comments a channel remembers (for likes re-sends and new viewers)
    initial_comments: int = 20  # recent comments a new viewer gets after its snapshot
    reorder_wait_s: float = 1.0  # how long a missing seq is waited for before a re-snapshot
    max_pending: int = 1000  # out-of-order updates held per channel
    likes_metric: str | None = "likes"  # the metric whose totals are attached to comments

    def __post_init__(self) -> None:
        if self.push_rate <= 0 or self.comment_rate <= 0 or self.max_blocked_s <= 0:
            raise ValueError("push_rate, comment_rate and max_blocked_s must be positive")


@dataclass(slots=True)
class Snapshot:
    """A channel's full state read from Redis atomically with its seq (per root partition)."""

    channel: str
    seq: int  # the sum of `parts`
    values: list[tuple[str, str, float]] = field(default_factory=list)  # (metric, key, total)
    top: list[tuple[str, float]] = field(default_factory=list)  # leaderboard, best first
    parts: dict[int, int] | None = None  # root partition -> its seq of the channel (None: all in one, 0)

    def seqs(self) -> dict[int, int]:
        return {0: self.seq} if self.parts is None else self.parts


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message of the viewer protocol, encoded once and sent to any number of viewers."""

    type: str
    channel: str
    seq: int  # 0 for messages without one (comments, errors, redirects)
    data: bytes  # the JSON object


def snapshot_message(s: Snapshot) -> Outgoing:
    data = orjson.dumps(
        {
            "type": "snapshot",
            "channel": s.channel,
            "seq": s.seq,
            "values": [list(v) for v in s.values],
            "top": [list(t) for t in s.top],
        }
    )
    return Outgoing("snapshot", s.channel, s.seq, data)


def update_message(channel: str, seq: int, values: list[list[Any]]) -> Outgoing:
    data = orjson.dumps({"type": "update", "channel": channel, "seq": seq, "values": values})
    return Outgoing("update", channel, seq, data)


def comments_message(channel: str, items: list[dict[str, Any]]) -> Outgoing:
    return Outgoing(
        "comments", channel, 0, orjson.dumps({"type": "comments", "channel": channel, "items": items})
    )


def error_message(reason: str) -> Outgoing:
    return Outgoing("error", "", 0, orjson.dumps({"type": "error", "reason": reason}))


def redirect_message(url: str) -> Outgoing:
    return Outgoing("redirect", "", 0, orjson.dumps({"type": "redirect", "url": url}))


def parse_channels(text: str | None) -> list[str]:
    """`a,b` -> ["a", "b"] (empty parts dropped, order kept, duplicates removed)."""
    if not text:
        return []
    return list(dict.fromkeys(c for c in text.split(",") if c))


def parse_since(text: str | None) -> dict[str, int]:
    """`a:12,b:30` -> {"a": 12, "b": 30}; a channel may itself hold ':' (the last one splits)."""
    out: dict[str, int] = {}
    if not text:
        return out
    for part in text.split(","):
        channel, sep, seq = part.rpartition(":")
        if not sep or not channel:
            raise ValueError(f"since must be channel:seq pairs, got {part[:64]!r}")
        try:
            out[channel] = int(seq)
        except ValueError:
            raise ValueError(f"since must be channel:seq pairs, got {part[:64]!r}") from None
    return out


@dataclass(slots=True)
class Comment:
    """One comment of a channel's live feed, with the latest like count of its key."""

    id: str
    key: str
    user: str | None
    text: str | None
    ts: int | None
    likes: float
    order: int  # arrival number in its channel

    def item(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "user": self.user,
            "text": self.text,
            "ts": self.ts,
            "likes": self.likes,
        }


def top_liked(comments: Iterable[Comment], n: int) -> set[str]:
    """Keys of the `n` most liked comments (comments without likes are never "top liked")."""
    liked = [c for c in comments if c.likes > 0]
    return {c.key for c in heapq.nlargest(n, liked, key=lambda c: (c.likes, c.order))}


def sample_comments(
    candidates: Sequence[Comment], keep: set[str], budget: int, rng: random.Random
) -> list[Comment]:
    """At most `budget` comments, except that every candidate in `keep` gets through; arrival order."""
    if len(candidates) <= budget:
        return list(candidates)
    kept = [c for c in candidates if c.key in keep]
    rest = [c for c in candidates if c.key not in keep]
    room = max(0, budget - len(kept))
    chosen = kept + (rng.sample(rest, room) if room < len(rest) else rest)
    chosen.sort(key=lambda c: c.order)
    return chosen


class _Sub:
    """What one viewer has of one channel: the seq of its last push (-1: none)."""

    __slots__ = ("awaiting", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.awaiting = True  # waiting for a snapshot


class _ViewerState:
    __slots__ = ("blocked_since", "subs")

    def __init__(self) -> None:
        self.subs: dict[str, _Sub] = {}
        self.blocked_since: float | None = None


class _Channel(Generic[V]):
    __slots__ = (
        "allowance",
        "allowance_at",
        "applied",
        "awaiting",
        "comments_seen",
        "entries",
        "floor",
        "fresh",
        "gap_since",
        "last_push",
        "likes",
        "name",
        "parts",
        "pending",
        "reading",
        "recent",
        "rereads",
        "resync",
        "ticket",
        "viewers",
    )

    def __init__(self, name: str, comment_rate: float, now: float) -> None:
        self.name = name
        self.applied: int | None = None  # seq of the state held; None before the first snapshot
        self.floor = -1  # entries at or below this seq were trimmed
        self.parts: dict[int, int] = {}  # root partition -> seq applied there; `applied` is their sum
        self.pending: dict[tuple[int, int], ChannelUpdate] = {}  # (root partition, seq) -> update
        self.rereads = 0  # snapshots read again in a row because they were behind the node
        self.gap_since: float | None = None
        # (metric, key) -> (seq of its last change, value), oldest change first
        self.entries: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self.likes: dict[str, float] = {}
        self.recent: OrderedDict[str, Comment] = OrderedDict()
        self.fresh: dict[str, None] = {}  # comment keys to announce: new, or their likes changed
        self.comments_seen = 0
        self.allowance = comment_rate
        self.allowance_at = now
        self.viewers: dict[V, _Sub] = {}
        self.awaiting = 0
        self.reading = False
        self.resync = False
        self.ticket = 0
        self.last_push = -math.inf


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """The runtime reads `channel` from Redis and hands the result back with this ticket."""

    channel: str
    ticket: int


# One message and the viewers it goes to. A viewer's messages keep the order of the groups.
Group = tuple[Outgoing, list[V]]


@dataclass(slots=True)
class Collected(Generic[V]):
    sends: list[Group[V]] = field(default_factory=list)
    disconnect: list[V] = field(default_factory=list)  # blocked past max_blocked_s


class Fanout(Generic[V]):
    """Channels, viewers and what each viewer still needs. Drive it with the methods below."""

    def __init__(
        self, config: FanoutConfig, feed_types: frozenset[str] = frozenset(), rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.interval = 1.0 / config.push_rate
        self._feed_types = feed_types or None
        self._rng = rng or random.Random()
        self._channels: dict[str, _Channel[V]] = {}
        self._viewers: dict[V, _ViewerState] = {}
        self._dirty: dict[str, None] = {}
        self._gaps: dict[str, None] = {}
        self._wanted: dict[str, None] = {}
        self._tickets = 0
        self.stale_updates = 0  # duplicates and updates older than the state held
        self.resyncs = 0

    # --- viewers -------------------------------------------------------------

    def subscribe(self, viewer: V, channel: str, since: int | None, now: float) -> None:
        """Start sending `channel` to `viewer`, from a fresh snapshot (see take_snapshot_requests)."""
        state = self._viewers.get(viewer)
        if state is None:
            state = self._viewers[viewer] = _ViewerState()
        if channel in state.subs:
            return
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel(channel, self.config.comment_rate, now)
        sub = _Sub(-1 if since is None else since)
        state.subs[channel] = sub
        ch.viewers[viewer] = sub
        ch.awaiting += 1
        if not ch.reading:
            self._wanted[channel] = None

    def unsubscribe(self, viewer: V, channel: str) -> None:
        state = self._viewers.get(viewer)
        if state is None:
            return
        sub = state.subs.pop(channel, None)
        if sub is not None:
            self._leave(channel, viewer, sub)

    def remove(self, viewer: V) -> None:
        state = self._viewers.pop(viewer, None)
        if state is not None:
            for channel, sub in state.subs.items():
                self._leave(channel, viewer, sub)

    def _leave(self, channel: str, viewer: V, sub: _Sub) -> None:
        ch = self._channels[channel]
        del ch.viewers[viewer]
        if sub.awaiting:
            ch.awaiting -= 1
        if not ch.viewers:  # nobody watches: forget the channel
            del self._channels[channel]
            self._dirty.pop(channel, None)
            self._gaps.pop(channel, None)
            self._wanted.pop(channel, None)

    def viewer_state(self, viewer: V) -> dict[str, int]:
        """Everything kept per viewer: the seq it has of each of its channels."""
        state = self._viewers.get(viewer)
        return {} if state is None else {c: s.seq for c, s in state.subs.items()}

    def channels_of(self, viewer: V) -> list[str]:
        state = self._viewers.get(viewer)
        return [] if state is None else list(state.subs)

    def channel_entries(self, channel: str) -> int:
        ch = self._channels.get(channel)
        return 0 if ch is None else len(ch.entries)

    def channel_seq(self, channel: str) -> int | None:
        ch = self._channels.get(channel)
        return None if ch is None else ch.applied

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    @property
    def channels(self) -> int:
        return len(self._channels)

    # --- inputs --------------------------------------------------------------

    def on_update(self, update: ChannelUpdate, now: float) -> None:
        ch = self._channels.get(update.channel)
        if ch is None:
            return  # nobody here watches it
        if ch.applied is not None and update.seq <= ch.parts.get(update.root, 0):
            self.stale_updates += 1
            return
        pending = ch.pending
        pending[(update.root, update.seq)] = update
        if len(pending) > self.config.max_pending:
            del pending[min(pending)]
        if ch.applied is not None:
            self._advance(ch, now)

    def on_comment(self, raw: bytes, now: float) -> bool:
        """A feed event (raw JSON of a feed type); False if it is not one."""
        try:
            obj = orjson.loads(raw)
            _type, key, channel, ts, _value, user, event_id, _sub = check_event(obj, self._feed_types)
        except (orjson.JSONDecodeError, InvalidEvent):
            return False
        ch = self._channels.get(channel)
        if ch is None or key in ch.recent:
            return True
        text = obj.get("text")
        comment = Comment(
            event_id or key,
            key,
            user,
            text if isinstance(text, str) else None,
            ts or None,
            ch.likes.get(key, 0),
            ch.comments_seen,
        )
        ch.comments_seen += 1
        ch.recent[key] = comment
        if len(ch.recent) > self.config.recent_comments:
            old, _ = ch.recent.popitem(last=False)
            ch.fresh.pop(old, None)
        ch.fresh[key] = None
        self._dirty[channel] = None
        return True

    def seed_comments(self, request: SnapshotRequest, items: Iterable[Mapping[str, Any]]) -> int:
        """The channel's comment history (oldest first), read from Redis with its first snapshot: what this
        node has not seen goes before what it has, so the introduction of every viewer, new or resuming,
        holds the channel's recent comments whichever node serves it. Only on a channel's first snapshot
        (all its viewers are new then): later, a comment is announced live from the feed. How many were
        added."""
        ch = self._channels.get(request.channel)
        if ch is None or ch.ticket != request.ticket or ch.applied is not None:
            return 0
        seen = ch.recent
        merged: OrderedDict[str, Comment] = OrderedDict()
        for it in items:
            key = it.get("key")
            if not isinstance(key, str) or key in seen or key in merged:
                continue
            user, text, ts, cid = it.get("user"), it.get("text"), it.get("ts"), it.get("id")
            merged[key] = Comment(
                cid if isinstance(cid, str) else key,
                key,
                user if isinstance(user, str) else None,
                text if isinstance(text, str) else None,
                ts if isinstance(ts, int) else None,
                ch.likes.get(key, 0),
                0,
            )
        added = len(merged)
        if not added:
            return 0
        merged.update(seen)
        while len(merged) > self.config.recent_comments:
            old, _ = merged.popitem(last=False)
            ch.fresh.pop(old, None)
        for order, comment in enumerate(merged.values()):
            comment.order = order
        ch.comments_seen = len(merged)
        ch.recent = merged
        return added

    def take_snapshot_requests(self) -> list[SnapshotRequest]:
        """Channels to read from Redis now (new viewers, or a gap to repair); one read per channel."""
        out = []
        for channel in self._wanted:
            ch = self._channels[channel]
            self._tickets += 1
            ch.ticket = self._tickets
            ch.reading = True
            out.append(SnapshotRequest(channel, ch.ticket))
        self._wanted.clear()
        return out

    def wants(self, request: SnapshotRequest) -> bool:
        """Whether a read is still of use (the channel may have lost all its viewers meanwhile)."""
        ch = self._channels.get(request.channel)
        return ch is not None and ch.ticket == request.ticket

    def on_snapshot(self, request: SnapshotRequest, snapshot: Snapshot, now: float) -> list[Group[V]]:
        """The read for `request` came back: snapshots (and recent comments) for who needs them."""
        ch = self._channels.get(request.channel)
        if ch is None or ch.ticket != request.ticket:
            return []
        ch.reading = False
        parts = snapshot.seqs()
        if ch.applied is not None:
            held = ch.parts
            if any(parts.get(r, 0) < s for r, s in held.items()) and ch.rereads < MAX_REREADS:
                # behind what this node applied in some partition (read before an update it has):
                # its values there are older than the node's, so read it again
                ch.rereads += 1
                self._wanted[ch.name] = None
                return []
            if any(s > held.get(r, 0) for r, s in parts.items()):
                ch.resync = True  # ahead in some partition: every viewer needs it, not only new ones
        ch.rereads = 0
        resync, ch.resync = ch.resync, False
        if ch.applied is None:
            ch.fresh.clear()  # every viewer is new: the comments so far go in their introduction
        if ch.applied is None or resync:
            # the channel's sequence (re)starts here: everything up to `parts` is in the snapshot
            for r, s in parts.items():
                if s > ch.parts.get(r, 0):
                    ch.parts[r] = s
            seq = ch.applied = sum(ch.parts.values())  # the snapshot's; held updates after it go on top
            for rs in [rs for rs in ch.pending if rs[1] <= ch.parts.get(rs[0], 0)]:
                del ch.pending[rs]
            ch.gap_since = None
            self._gaps.pop(ch.name, None)
            self._advance(ch, now)
        else:
            seq = ch.applied
        if seq != snapshot.seq:
            snapshot = Snapshot(snapshot.channel, seq, snapshot.values, snapshot.top, dict(ch.parts))
        likes_metric = self.config.likes_metric
        if likes_metric is not None and ch.recent:
            for metric, key, value in snapshot.values:
                if metric == likes_metric and key in ch.recent:
                    ch.recent[key].likes = value
                    ch.likes[key] = value
        snapped: list[V] = []
        introduced: list[V] = []
        for viewer, sub in ch.viewers.items():
            if not (sub.awaiting or (resync and sub.seq < seq)):
                continue
            if seq > sub.seq:
                snapped.append(viewer)
                sub.seq = seq
            if sub.awaiting:
                sub.awaiting = False
                introduced.append(viewer)
        ch.awaiting = 0
        if ch.applied is not None and ch.entries:
            self._dirty[ch.name] = None  # some may be behind the state held
        out: list[Group[V]] = []
        if snapped:
            out.append((snapshot_message(snapshot), snapped))
        if introduced and ch.recent:
            out.append((self._intro(ch), introduced))
        return out

    def on_snapshot_failed(self, request: SnapshotRequest) -> None:
        """The read failed: ask again (the runtime waits a little before it does)."""
        ch = self._channels.get(request.channel)
        if ch is not None and ch.ticket == request.ticket:
            ch.reading = False
            self._wanted[ch.name] = None

    def _intro(self, ch: _Channel[V]) -> Outgoing:
        n = self.config.initial_comments
        recent = list(ch.recent.values())
        keep = top_liked(recent, self.config.keep_top_liked)
        chosen = [c for c in recent[:-n] if c.key in keep] + recent[-n:]
        return comments_message(ch.name, [c.item() for c in chosen])

    def _advance(self, ch: _Channel[V], now: float) -> None:
        """Apply held updates in seq order as far as there is no gap."""
        assert ch.applied is not None
        pending = ch.pending
        parts = ch.parts
        applied = ch.applied
        for root in {r for r, _ in pending}:
            nxt = parts.get(root, 0) + 1
            while (root, nxt) in pending:
                applied += 1
                self._apply(ch, pending.pop((root, nxt)), applied)
                parts[root] = nxt
                nxt += 1
        if applied > ch.applied:
            ch.applied = applied
            self._dirty[ch.name] = None
        if pending:
            if ch.gap_since is None:
                ch.gap_since = now
                self._gaps[ch.name] = None
        elif ch.gap_since is not None:
            ch.gap_since = None
            self._gaps.pop(ch.name, None)

    def _apply(self, ch: _Channel[V], update: ChannelUpdate, seq: int) -> None:
        entries = ch.entries
        likes_metric = self.config.likes_metric
        for metric, key, value in update.values:
            k = (metric, key)
            entries[k] = (seq, value)
            entries.move_to_end(k)
            if metric == likes_metric:
                ch.likes[key] = value
                comment = ch.recent.get(key)
                if comment is not None and comment.likes != value:
                    comment.likes = value
                    ch.fresh[key] = None

    # --- output --------------------------------------------------------------

    def next_due(self) -> float | None:
        """When `collect` next has something to do (None: only after new input)."""
        due: float | None = None
        channels = self._channels
        for name in self._dirty:
            t = channels[name].last_push + self.interval
            if due is None or t < due:
                due = t
        wait = self.config.reorder_wait_s
        for name in self._gaps:
            gap_since = channels[name].gap_since
            if gap_since is not None and (due is None or gap_since + wait < due):
                due = gap_since + wait
        return due

    def collect(self, now: float, writable: Callable[[V], bool], max_sends: int = 0) -> Collected[V]:
        """Pushes due now. `writable(viewer)` says whether its socket can take more without queueing.

        With `max_sends`, channels after the one that reaches it wait for the next call (in the
        order they became due), so that the caller can let other work in between.
        """
        out: Collected[V] = Collected()
        wait = self.config.reorder_wait_s
        for name in list(self._gaps):
            ch = self._channels[name]
            if ch.gap_since is not None and now - ch.gap_since >= wait and not ch.resync:
                self._request_resync(ch)
        doomed: dict[V, None] = {}
        interval = self.interval
        sent = 0
        for name in list(self._dirty):
            ch = self._channels[name]
            if now < ch.last_push + interval:
                continue
            del self._dirty[name]
            start = len(out.sends)
            self._push(ch, now, writable, out.sends, doomed)
            if max_sends:
                sent += sum(len(viewers) for _, viewers in out.sends[start:])
                if sent >= max_sends:
                    break
        for viewer in doomed:
            self.remove(viewer)
        out.disconnect = list(doomed)
        return out

    def _request_resync(self, ch: _Channel[V]) -> None:
        """A seq never came: give every viewer of the channel a fresh snapshot."""
        ch.resync = True
        ch.gap_since = None
        self._gaps.pop(ch.name, None)
        self.resyncs += 1
        if not ch.reading:
            self._wanted[ch.name] = None

    def _push(
        self,
        ch: _Channel[V],
        now: float,
        writable: Callable[[V], bool],
        sends: list[Group[V]],
        doomed: dict[V, None],
    ) -> None:
        applied = ch.applied
        if applied is None:  # before the first snapshot; it marks the channel dirty again
            return
        ch.last_push = now
        feed = self._take_feed(ch, now)
        if ch.resync:
            applied = -1  # hold updates: the snapshot on its way replaces them
        by_seq: dict[int, Group[V]] = {}
        fed: list[V] = []
        floor = applied
        retry = False
        viewers = self._viewers
        max_blocked = self.config.max_blocked_s
        for viewer, sub in ch.viewers.items():
            if sub.awaiting:
                continue
            seq = sub.seq
            behind = seq < applied
            if not behind and feed is None:
                continue
            state = viewers[viewer]
            if not writable(viewer):
                if state.blocked_since is None:
                    state.blocked_since = now
                elif now - state.blocked_since >= max_blocked:
                    doomed[viewer] = None
                if behind:
                    retry = True
                    if seq < floor:
                        floor = seq
                continue
            state.blocked_since = None
            if behind:
                if seq < ch.floor:  # its delta was trimmed away (cannot happen in order); start over
                    sub.awaiting = True
                    ch.awaiting += 1
                    if not ch.reading:
                        self._wanted[ch.name] = None
                    continue
                group = by_seq.get(seq)
                if group is None:
                    group = by_seq[seq] = (self._delta(ch, seq, applied), [])
                group[1].append(viewer)
                sub.seq = applied
            if feed is not None:
                fed.append(viewer)
        sends.extend(by_seq.values())  # a viewer's update goes before its comments
        if fed and feed is not None:
            sends.append((feed, fed))
        if retry:
            self._dirty[ch.name] = None
        if not ch.awaiting and not ch.resync and floor > ch.floor:
            self._trim(ch, floor)

    def _delta(self, ch: _Channel[V], since: int, seq: int) -> Outgoing:
        values: list[list[Any]] = []
        for (metric, key), (changed, value) in reversed(ch.entries.items()):
            if changed <= since:
                break
            values.append([metric, key, value])
        values.reverse()
        return update_message(ch.name, seq, values)

    def _trim(self, ch: _Channel[V], floor: int) -> None:
        """Drop changes every viewer already has: the log holds at most one entry per key anyway."""
        entries = ch.entries
        while entries:
            key = next(iter(entries))
            if entries[key][0] > floor:
                break
            del entries[key]
        ch.floor = floor

    def _take_feed(self, ch: _Channel[V], now: float) -> Outgoing | None:
        rate = self.config.comment_rate
        ch.allowance = min(rate, ch.allowance + rate * (now - ch.allowance_at))
        ch.allowance_at = now
        if not ch.fresh:
            return None
        candidates = [ch.recent[k] for k in ch.fresh if k in ch.recent]
        ch.fresh.clear()
        if not candidates:
            return None
        keep = top_liked(ch.recent.values(), self.config.keep_top_liked)
        chosen = sample_comments(candidates, keep, int(ch.allowance), self._rng)
        ch.allowance = max(0.0, ch.allowance - len(chosen))
        if not chosen:
            return None
        return comments_message(ch.name, [c.item() for c in chosen])


def valid_channel(name: str) -> bool:
    """A channel a viewer may name: CR and LF would break SSE framing, commas the query syntax."""
    return 0 < len(name) <= MAX_KEY_CHARS and not any(c in name for c in "\r\n,")
