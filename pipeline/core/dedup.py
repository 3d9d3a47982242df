"""Event-id deduplication state of one source partition: local, bounded, durable with the offsets.

Tier 1 asks, for every event that carries an id, whether the partition already
counted that id within the horizon. The answer costs no remote call:

- **Pending ids** (the open window's) are kept like the committed ones: a
  batch's ids are hashed, sorted (which also finds the batch's own repeats)
  and kept as a segment, merged size-tiered with the window's others, and set
  in the Bloom filter at once. When the window closes they are sealed
  (`seal`): the next window's ids go on apart while the closed one's
  transaction is under way. They become committed when it commits (`commit`:
  the segments move to their buckets) and vanish when it aborts (`abort`,
  with the next window's: the filter is rebuilt without them), exactly like
  the windows' counts. No object per id outlives its batch.
- **Committed ids** are kept per time bucket (`horizon / BUCKETS` wide) as
  sorted arrays of 96-bit hashes: a `uint64` and a `uint32` column, 12 bytes
  per id. A blocked Bloom filter over all of them and the pending ones (16 to
  32 bits per id, up to 5 bits in one 64-bit word: 0.1 to 0.4 % false
  positives) answers most lookups with one vectorised gather; only its
  positives are searched, vectorised, in the sorted arrays.
- **Expiry by record time.** A batch's ids go to the bucket of the batch's
  newest record time (when the broker received them), and a bucket is dropped
  once the partition's watermark (the newest record time it saw) is a whole
  horizon past the bucket's end. So an id is remembered until the partition
  receives records written a horizon after the original arrived: a retry sent
  within the horizon of its original's first send always meets it.
- **Durable.** `changelog()` encodes the pending ids (bucket, then packed
  hashes: 12 bytes per id) for the window's transaction; `next_offset` says
  which committed window the state ends with; `load()` takes such records
  back when a worker rebuilds a partition it was assigned.

The hash is xxh3-128 of the scoped id, truncated to 96 bits: with n ids in
the horizon of one partition the chance that two different ids collide
(and a real event is dropped) is about n² / 2⁹⁷: 10⁻¹⁴ for 60 million ids.

Sans-I/O: no Kafka, no Redis; numpy and xxhash only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xxhash

BUCKETS = 8  # buckets per horizon: memory holds at most (1 + 1/BUCKETS) horizons of ids
BYTES_PER_ID = 12  # committed, in memory and in the changelog (96-bit hash)
BLOOM_BITS_PER_ID = 16  # to 32: the size rounds up to a power of two
BLOOM_PROBES = 5  # bits set per id, all in one 64-bit word (6 hash bits each: at most 5 in 32)
MIN_BLOOM_BITS = 1 << 16
CHANGELOG_MAGIC = b"D1"
_BUCKET_HEAD = struct.Struct(">qI")  # bucket start (ms), ids in it

digest = xxhash.xxh3_128_digest  # 16 bytes, big-endian; the first 12 are the id's key


def changelog_retention_ms(horizon_ms: int) -> int:
    """How long Kafka keeps the changelog: an id is needed until records sent a horizon and a bucket
    after it arrive; a quarter horizon and five minutes more absorb lag and clock skew."""
    return horizon_ms + horizon_ms // 4 + 300_000


def bytes_per_id() -> float:
    """Memory per committed id inside the horizon: the hash columns plus the Bloom filter's share."""
    return BYTES_PER_ID + BLOOM_BITS_PER_ID / 8


def _columns(digests: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Joined 16-byte digests -> (hi uint64, lo uint32): the 96-bit keys."""
    pairs = np.frombuffer(digests, dtype=">u8").reshape(-1, 2)
    return pairs[:, 0].astype(np.uint64), (pairs[:, 1] >> np.uint64(32)).astype(np.uint32)


@dataclass(slots=True)
class _Segment:
    hi: np.ndarray  # sorted
    lo: np.ndarray  # aligned with hi

    def __len__(self) -> int:
        return len(self.hi)

    def holds(self, hi: int, lo: int) -> bool:
        h = self.hi
        i = int(np.searchsorted(h, np.uint64(hi)))
        while i < len(h) and int(h[i]) == hi:
            if int(self.lo[i]) == lo:
                return True
            i += 1
        return False


def _segment(hi: np.ndarray, lo: np.ndarray, kind: Literal["quicksort", "stable"] = "quicksort") -> _Segment:
    order = np.argsort(hi, kind=kind)
    return _Segment(hi[order], lo[order])


def _merge(a: _Segment, b: _Segment) -> _Segment:
    # two sorted runs: timsort ("stable") merges them in one linear pass
    return _segment(np.concatenate((a.hi, b.hi)), np.concatenate((a.lo, b.lo)), "stable")


def _probe_masks() -> np.ndarray:
    """A word's bits for each value of an id's low 16 hash bits: up to BLOOM_PROBES bits apiece,
    6 bits each of a multiplicative hash of the value (one table lookup per id, not BLOOM_PROBES
    shifts)."""
    mixed = (np.arange(1 << 16, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    masks = np.zeros(1 << 16, dtype=np.uint64)
    for _ in range(BLOOM_PROBES):
        masks |= np.uint64(1) << (mixed & np.uint64(63))
        mixed >>= np.uint64(6)  # BLOOM_PROBES x 6 bits: within the 32 taken
    return masks


_MASKS = _probe_masks()


class _Bloom:
    """A register-blocked Bloom filter: each id sets BLOOM_PROBES bits of one 64-bit word.

    One word per id makes an insert or a lookup one vectorised gather (a classic filter
    touches BLOOM_PROBES words); the price is a somewhat higher false-positive rate, which
    only costs an exact search of the sorted columns.
    """

    def __init__(self, capacity: int) -> None:
        bits = MIN_BLOOM_BITS
        while bits < capacity * BLOOM_BITS_PER_ID:
            bits <<= 1
        self.capacity = bits // BLOOM_BITS_PER_ID
        self.words = np.zeros(bits // 64, dtype=np.uint64)
        self._index_mask = np.uint64(len(self.words) - 1)

    def _where(self, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word index, bit mask) of each id: the index from hi's top half, the bits from its bottom 16."""
        return (hi >> np.uint64(32)) & self._index_mask, _MASKS[hi & np.uint64(0xFFFF)]

    def add(self, hi: np.ndarray) -> None:
        if not len(hi):
            return
        index, mask = self._where(hi)
        np.bitwise_or.at(self.words, index, mask)  # unbuffered: ids that share a word keep all their bits

    def may_hold(self, hi: np.ndarray) -> np.ndarray:
        index, mask = self._where(hi)
        return np.asarray((self.words[index] & mask) == mask)


class PartitionIds:
    """The ids one source partition counted within the horizon (see the module docstring)."""

    def __init__(self, horizon_ms: int) -> None:
        if horizon_ms <= 0:
            raise ValueError("the dedup horizon must be positive")
        self.horizon_ms = horizon_ms
        self.bucket_ms = max(1, -(-horizon_ms // BUCKETS))
        self.watermark_ms = 0
        self.next_offset = -1  # offset after the last committed window (-1: unknown, rebuild to use)
        # the open window's ids: sorted segments per bucket start, merged like the committed ones
        self._open: list[tuple[int, _Segment]] = []
        self._pending = 0
        # a closed window's, whose transaction is under way (None: no window closed since the last
        # commit); tier 1 reads the next window meanwhile
        self._sealed: list[tuple[int, _Segment]] | None = None
        self._sealed_ids = 0
        self._buckets: dict[int, list[_Segment]] = {}
        self._committed = 0
        self._bloom = _Bloom(0)  # over the committed and the open window's ids

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def pending(self) -> int:
        """Ids not committed yet: the open window's and a closed one's whose transaction is under way."""
        return self._pending + self._sealed_ids

    @property
    def memory_bytes(self) -> int:
        """Bytes of the committed state (hash columns and Bloom filter); pending ids are a window's worth."""
        columns = sum(s.hi.nbytes + s.lo.nbytes for segs in self._buckets.values() for s in segs)
        return columns + self._bloom.words.nbytes

    def seen(self, ids: list[str], now_ms: int) -> list[int]:
        """Which ids (in offset order) were counted before: their indexes, ascending.
        The others become pending.

        `now_ms` is the newest record time of the batch: it moves the watermark and places the
        batch's new ids in their bucket. Record time, set when the broker got the record, not an
        event's own `ts`: a writer's clock far in the future must not expire every id at once.
        """
        if now_ms > self.watermark_ms:
            self.watermark_ms = now_ms
        if not ids:
            return []
        hi, lo = _columns(b"".join(map(digest, map(str.encode, ids))))
        order = np.argsort(hi)
        hi, lo = hi[order], lo[order]
        repeat = np.zeros(len(hi), dtype=bool)  # in hash order
        same = np.flatnonzero(hi[1:] == hi[:-1])
        if len(same):  # equal hashes within the batch: the first of each id, in offset order, is new
            for run in np.split(same, np.flatnonzero(np.diff(same) != 1) + 1):
                first_of: dict[int, int] = {}
                for j in range(int(run[0]), int(run[-1]) + 2):
                    key, at = int(lo[j]), int(order[j])
                    if key in first_of:
                        earlier = first_of[key]
                        if at < int(order[earlier]):
                            repeat[earlier], first_of[key] = True, j
                        else:
                            repeat[j] = True
                    else:
                        first_of[key] = j
        if self._committed or self.pending:
            maybe = self._bloom.may_hold(hi)
            maybe &= ~repeat
            candidates = np.flatnonzero(maybe)
            if len(candidates):
                repeat[candidates[self._holds(hi[candidates], lo[candidates])]] = True
        if repeat.any():
            repeats = np.sort(order[repeat]).tolist()
            keep = ~repeat
            hi, lo = hi[keep], lo[keep]
        else:
            repeats = []
        if len(hi):
            self._pending += len(hi)
            if self._committed + self.pending > self._bloom.capacity:
                self._open.append((now_ms - now_ms % self.bucket_ms, _Segment(hi, lo)))
                self._rebuild_bloom()
            else:
                self._bloom.add(hi)
                self._open.append((now_ms - now_ms % self.bucket_ms, _Segment(hi, lo)))
            self._settle_open()
        return repeats

    def _settle_open(self) -> None:
        """Merge the newest open segment into its elder of the same bucket while it is as large."""
        segs = self._open
        while len(segs) > 1 and segs[-1][0] == segs[-2][0] and len(segs[-1][1]) >= len(segs[-2][1]):
            start, b = segs.pop()
            segs[-1] = (start, _merge(segs[-1][1], b))

    def _segments(self) -> Iterator[_Segment]:
        for segs in self._buckets.values():
            yield from segs
        for _, seg in self._sealed or ():
            yield seg
        for _, seg in self._open:
            yield seg

    def _holds(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Which of these ids (hashes) are committed or pending: a mask."""
        found = np.zeros(len(hi), dtype=bool)
        for seg in self._segments():
            h = seg.hi
            at = np.searchsorted(h, hi)
            inside = at < len(h)
            at = np.where(inside, at, 0)
            same_hi = inside & (h[at] == hi)
            if not same_hi.any():
                continue
            found |= same_hi & (seg.lo[at] == lo)
            # two ids of one segment with the same 64 high bits: look past the first (all but never)
            for j in np.flatnonzero(same_hi & ~found).tolist():
                found[j] = seg.holds(int(hi[j]), int(lo[j]))
        return found

    def seal(self) -> None:
        """The open window closed: its ids are the ones the next `commit` commits (or `abort` drops),
        and the ids seen from now on belong to the next window."""
        # (a window closed before the last one's commit answered, which tier 1 never does, joins it)
        self._sealed = (self._sealed or []) + self._open
        self._sealed_ids += self._pending
        self._open, self._pending = [], 0

    def changelog(self, max_bytes: int = 1 << 20) -> list[bytes]:
        """The ids not committed yet as changelog records of at most `max_bytes` each (none when
        there are none): at a window's close, that window's."""
        records: list[bytes] = []
        if not self.pending:
            return records
        room = max(1, (max_bytes - len(CHANGELOG_MAGIC) - _BUCKET_HEAD.size) // BYTES_PER_ID)
        out, size = [CHANGELOG_MAGIC], len(CHANGELOG_MAGIC)
        for start, seg in (self._sealed or []) + self._open:
            for at in range(0, len(seg), room):
                h, low = seg.hi[at : at + room], seg.lo[at : at + room]
                part = _BUCKET_HEAD.size + BYTES_PER_ID * len(h)
                if size + part > max_bytes and size > len(CHANGELOG_MAGIC):
                    records.append(b"".join(out))
                    out, size = [CHANGELOG_MAGIC], len(CHANGELOG_MAGIC)
                out += [
                    _BUCKET_HEAD.pack(start, len(h)),
                    h.astype(">u8").tobytes(),
                    low.astype(">u4").tobytes(),
                ]
                size += part
        records.append(b"".join(out))
        return records

    def commit(self, next_offset: int) -> None:
        """The closed window's transaction committed (resuming at `next_offset`): its ids are counted
        for good. Without a `seal` since the last commit, the open window is the one committed."""
        if self._sealed is None:
            self.seal()
        self.next_offset = next_offset
        sealed, self._sealed, self._sealed_ids = self._sealed or [], None, 0
        for start, seg in sealed:
            self._add(start, seg, in_bloom=True)
        self._expire()

    def abort(self) -> None:
        """The window's transaction aborted: its events, and all read after them, will be read (and
        their ids seen) again: the closed window's ids and the open one's are dropped."""
        dropped = self.pending
        self._open, self._pending = [], 0
        self._sealed, self._sealed_ids = None, 0
        if dropped:
            self._rebuild_bloom()  # without them

    def load(self, record: bytes) -> int:
        """Take back a changelog record of a committed window; returns the ids it held."""
        if not record.startswith(CHANGELOG_MAGIC):
            raise ValueError("not a dedup changelog record")
        at, ids = len(CHANGELOG_MAGIC), 0
        while at < len(record):
            start, n = _BUCKET_HEAD.unpack_from(record, at)
            at += _BUCKET_HEAD.size
            hi = np.frombuffer(record, dtype=">u8", count=n, offset=at).astype(np.uint64)
            at += 8 * n
            lo = np.frombuffer(record, dtype=">u4", count=n, offset=at).astype(np.uint32)
            at += 4 * n
            if n:
                self._add(start, _segment(hi, lo), in_bloom=False)
            self.watermark_ms = max(self.watermark_ms, start)
            ids += n
        self._expire()
        return ids

    def _add(self, start: int, seg: _Segment, *, in_bloom: bool) -> None:
        segs = self._buckets.setdefault(start, [])
        segs.append(seg)
        # size-tiered, like a binary counter: merge while the newest is at least as large as its elder,
        # so a bucket holds O(log n) segments and each id is merged O(log n) times
        while len(segs) > 1 and len(segs[-1]) >= len(segs[-2]):
            b = segs.pop()
            segs[-1] = _merge(segs[-1], b)
        self._committed += len(seg)
        if in_bloom:
            return
        if self._committed + self.pending > self._bloom.capacity:
            self._rebuild_bloom()
        else:
            self._bloom.add(seg.hi)

    def _expire(self) -> None:
        horizon_start = self.watermark_ms - self.horizon_ms
        old = [s for s in self._buckets if s + self.bucket_ms <= horizon_start]
        if not old:
            return
        for start in old:
            self._committed -= sum(len(seg) for seg in self._buckets.pop(start))
        self._rebuild_bloom()

    def _rebuild_bloom(self) -> None:
        self._bloom = _Bloom(self._committed + self.pending)
        for seg in self._segments():
            self._bloom.add(seg.hi)
