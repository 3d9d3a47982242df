"""Comment history: the recent comments of each channel, bounded by count and age, kept in Redis.

Tier 1 forwards comment events whole to the feed topic, inside its transactions. The root
tier also reads that topic (`read_committed`) and appends each comment to its channel's
history (`io/comment_history.py`, one Lua script per channel and batch), together with
the feed offset it came from: the script skips a record at or below the offset already
applied for its (channel, feed partition), so a replay after a crash or a rebalance never
repeats a comment. The history is capped at `max_count` items and `max_age_s` (age by the
record's timestamp: when tier 1 wrote it); a channel quiet for longer disappears.

A broadcast node reads the last N of a channel with its snapshot, so a viewer that joins
or resumes gets them whichever node serves it, even after that node restarted.

Keys (docs/CONTRACT.md): `T:{T:c:<digest>}:comments:<channel>` (LIST of JSON items, oldest
first) and `T:{T:c:<digest>}:comments-pos:<channel>` (HASH feed partition -> last offset
applied). Both carry one hash tag, a digest of the channel (a channel may hold braces), so
on Redis Cluster the script that writes them runs on one shard.

Sans-I/O: records in, what to write out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from pipeline.core.model import InvalidEvent, check_event


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    max_count: int = 100  # comments kept per channel
    max_age_s: float = 3600.0  # comments older than this (since tier 1 wrote them) are dropped

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_age_s <= 0:
            raise ValueError("comment history: max_count must be at least 1 and max_age_s positive")


class FeedRecord(NamedTuple):
    """One record of the feed topic as the root reads it."""

    partition: int
    offset: int
    timestamp_ms: int  # the record's timestamp (when tier 1 wrote it)
    value: bytes | None


class Append(NamedTuple):
    """One comment to append to its channel's history, with the feed position it comes from."""

    partition: int
    offset: int
    item: bytes  # JSON, starting with {"at":<ms>, (the script reads the age from there)


def channel_tag(topology: str, channel: str) -> str:
    """`T:{T:c:<digest>}`: every key of one channel's history shares this hash tag."""
    digest = hashlib.blake2b(channel.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{topology}:{{{topology}:c:{digest}}}"


def history_key(topology: str, channel: str) -> str:
    """LIST of the channel's recent comments, oldest first (JSON items, see `item`)."""
    return f"{channel_tag(topology, channel)}:comments:{channel}"


def history_positions_key(topology: str, channel: str) -> str:
    """HASH feed partition -> the last feed offset applied to the channel's history."""
    return f"{channel_tag(topology, channel)}:comments-pos:{channel}"


def item(at_ms: int, event: dict[str, Any], feed_types: frozenset[str]) -> tuple[str, bytes] | None:
    """(channel, item JSON) of a feed event; None when it is not a comment of a feed type."""
    try:
        _type, key, channel, ts, _value, user, event_id, _sub = check_event(event, feed_types)
    except InvalidEvent:
        return None
    text = event.get("text")
    body = {
        "id": event_id or key,
        "key": key,
        "user": user,
        "text": text if isinstance(text, str) else None,
        "ts": ts or None,
    }
    return channel, b'{"at":%d,' % max(0, at_ms) + orjson.dumps(body)[1:]


def plan(records: Iterable[FeedRecord], feed_types: frozenset[str]) -> dict[str, list[Append]]:
    """A batch of feed records -> the appends of each channel, in offset order (undecodable records
    and events of other types are left out; their offsets still count as read)."""
    out: dict[str, list[Append]] = {}
    for r in records:
        if not r.value:
            continue
        try:
            event = orjson.loads(r.value)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        got = item(r.timestamp_ms, event, feed_types)
        if got is None:
            continue
        channel, raw = got
        out.setdefault(channel, []).append(Append(r.partition, r.offset, raw))
    return out


def parse(raw: bytes | str, now_ms: int, max_age_s: float) -> dict[str, Any] | None:
    """A stored item back as a viewer's comment (without `at`), or None when too old or unreadable."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        return None
    at = obj.pop("at", 0)
    if not isinstance(at, int) or now_ms - at > max_age_s * 1000:
        return None
    return obj
