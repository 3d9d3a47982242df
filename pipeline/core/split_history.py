"""The split factor of every key as a function of time, the same for every writer.

Tier 1 deduplicates ids per source partition, so a retry must reach the partition of
its original. An event's partition follows from its key, its sub-key and so from the
key's split factor k; if k were each writer's own current view, a retry sent after k
changed (the key turned hot, or cooled), or by another writer, could go elsewhere.

So k is a step function of time, kept per key as a *history*: entries
(effective_ms, k) in increasing effective time, k = 1 meaning "not split" (the
writer's default applies). A writer routes an event by the k in force at the event's
`ts`, its first-send time, which the SDK and the gateway stamp and return, and which
a retry carries again. An event older than the history kept routes by the oldest k
known. The history is shared (Redis, `pipeline/io/splits.py`); a change is proposed
with an effective time a little in the future (the lead), longer than the interval at
which writers read the history back, so every writer knows an entry before any event
is routed by it. The entries in force at times already passed never change.

Who may change k: a proposal to grow k always applies (the hottest writer wins); a
proposal to shrink applies only while the latest entry is the one that writer put there
(the entry, not merely its k: two writers may put the same k at different times), so a
writer that sees a key cool never undoes a split another writer made.

Sans-I/O: times are arguments, histories plain tuples.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import orjson

from pipeline.core.model import MAX_SUBKEYS

Entry = tuple[int, int]  # (effective_ms, k)
History = tuple[Entry, ...]

_NEVER = MAX_SUBKEYS + 1  # above any k: bisect key for "every entry effective at ts"


class Proposal(NamedTuple):
    """A change a writer asks for: `k` for `key`; `expect`: the latest k it replaces, for a shrink."""

    key: str
    k: int
    expect: int | None


def k_at(history: History, ts_ms: int) -> int:
    """The k in force at `ts_ms`: the last entry effective at or before it; before the first, the first's."""
    if not history:
        return 1
    last = history[-1]
    if ts_ms >= last[0]:
        return last[1]
    at = bisect_right(history, (ts_ms, _NEVER)) - 1
    return history[at if at >= 0 else 0][1]


def propose(history: History, k: int, expect: int | None, effective_ms: int) -> History | None:
    """`history` with `k` in force from `effective_ms` (or just after its last entry), or None: no change.

    Growth (k above the latest) always applies; a shrink only when the latest k is `expect`.
    Entries already in the history are kept as they are: the past never changes.
    """
    if not 1 <= k <= MAX_SUBKEYS:
        raise ValueError(f"k must be within [1, {MAX_SUBKEYS}], got {k}")
    latest = history[-1][1] if history else 1
    if k == latest or (k < latest and expect != latest):
        return None
    if not history:
        return ((0, 1), (max(effective_ms, 1), k))  # before its first split a key was one key
    return (*history, (max(effective_ms, history[-1][0] + 1), k))


def trim(history: History, oldest_ms: int) -> History:
    """Drop what no event at or after `oldest_ms` is routed by; () when the key is plainly unsplit."""
    if not history:
        return history
    at = bisect_right(history, (oldest_ms, _NEVER)) - 1  # the entry in force at oldest_ms
    kept = history[at:] if at > 0 else history
    if len(kept) == 1 and kept[0][1] == 1:
        return ()
    return kept


def encode(history: History) -> bytes:
    """The stored value: JSON `[[effective_ms, k], ...]`, compact, so equal histories are equal bytes."""
    return orjson.dumps([list(entry) for entry in history])


def decode(raw: bytes | str) -> History:
    """A stored value back to a history; ValueError when it is not one."""
    doc = orjson.loads(raw)
    if not isinstance(doc, list):
        raise ValueError("a split history is a JSON list")
    out: list[Entry] = []
    for item in doc:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or type(item[0]) is not int
            or type(item[1]) is not int
            or not 1 <= item[1] <= MAX_SUBKEYS
            or (out and item[0] <= out[-1][0])
        ):
            raise ValueError(f"bad split history entry {item!r}")
        out.append((item[0], item[1]))
    return tuple(out)


class SplitHistory:
    """Every key's history as this writer knows it (keys never split are absent: k = 1)."""

    def __init__(self) -> None:
        self.histories: dict[str, History] = {}  # read directly on the send path
        self.raw: dict[str, bytes] = {}  # the stored value each history was read from
        self.version = b""  # the shared store's version of what is held here

    def __bool__(self) -> bool:
        return bool(self.histories)

    def get(self, key: str) -> History:
        return self.histories.get(key, ())

    def k_at(self, key: str, ts_ms: int) -> int:
        history = self.histories.get(key)
        return k_at(history, ts_ms) if history else 1

    def last(self, key: str) -> Entry | None:
        """The last entry of `key` (possibly not in force yet); None when the key has no history."""
        history = self.histories.get(key)
        return history[-1] if history else None

    def latest(self, key: str) -> int:
        """The last k proposed for `key` (possibly not in force yet)."""
        history = self.histories.get(key)
        return history[-1][1] if history else 1

    def set(self, key: str, raw: bytes | None) -> None:
        """One key's stored value (None or b"": the key has no history)."""
        history = decode(raw) if raw else ()
        if not raw or not history:
            self.histories.pop(key, None)
            self.raw.pop(key, None)
            return
        self.histories[key] = history
        self.raw[key] = raw

    def replace(self, stored: Mapping[str, bytes], version: bytes) -> list[str]:
        """Everything the store holds; keys whose value is not a history are skipped and returned."""
        histories: dict[str, History] = {}
        raw: dict[str, bytes] = {}
        bad: list[str] = []
        for key, value in stored.items():
            if self.raw.get(key) == value:
                histories[key], raw[key] = self.histories[key], value
                continue
            try:
                history = decode(value)
            except ValueError:
                bad.append(key)
                continue
            if history:
                histories[key], raw[key] = history, value
        self.histories, self.raw, self.version = histories, raw, version
        return bad

    def apply(self, change: Proposal, effective_ms: int, oldest_ms: int) -> bool:
        """A change applied here only (a writer without a shared store); True if the history changed."""
        history = self.get(change.key)
        new = propose(history, change.k, change.expect, effective_ms)
        if new is None:
            return False
        new = trim(new, oldest_ms)
        self.set(change.key, encode(new) if new else None)
        return True

    def stale(self, oldest_ms: int) -> list[str]:
        """Keys holding entries older than needed (to trim in the store)."""
        return [key for key, history in self.histories.items() if trim(history, oldest_ms) != history]


def reconcile(wanted: Mapping[str, int], history: SplitHistory, mine: Mapping[str, Entry]) -> list[Proposal]:
    """What this writer should propose so the shared k of its keys follows what it wants.

    `wanted`: the keys this writer splits now (key -> k); `mine`: the entry this writer last
    put in the shared history per key. A key it wants split wider than the history says is
    proposed again (another writer may have shrunk it); a key whose latest entry it put there
    and no longer wants that wide is shrunk, expecting the k it put there.
    """
    out: list[Proposal] = []
    for key in _union(wanted, mine):
        want = wanted.get(key, 1)
        last = history.last(key)
        latest = last[1] if last is not None else 1
        if want > latest:
            out.append(Proposal(key, want, None))
        elif want < latest and mine.get(key) == last:
            out.append(Proposal(key, want, latest))
    return out


def _union(a: Iterable[str], b: Iterable[str]) -> list[str]:
    seen = dict.fromkeys(a)
    seen.update(dict.fromkeys(b))
    return list(seen)
