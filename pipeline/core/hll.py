"""HyperLogLog registers for distinct users in PostgreSQL: mergeable, sans-I/O.

Partials carry the users of a distinct cell as a set; the sink turns it into 4,096 one-byte registers
(precision 12: a standard error of about 1.6 %), merges them register by register with what the row
holds (the maximum of each: merging is idempotent, commutative and associative, so applying a delta
twice could not even double count), and stores the estimate beside them. Small sets are counted by
linear counting, which is exact in practice for a few hundred users.

The hash is xxh64 of the user's UTF-8 bytes: the first 12 bits pick the register, the rank of the
first 1 bit in the other 52 (1 to 53) is the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import xxhash

P = 12
M = 1 << P
MAX_RANK = 64 - P + 1
_LOW = (1 << (64 - P)) - 1
_ALPHA = 0.7213 / (1 + 1.079 / M)


def registers(members: Iterable[str]) -> bytes:
    """The registers of a set of users."""
    regs = bytearray(M)
    for member in members:
        h = xxhash.xxh64_intdigest(member.encode())
        index = h >> (64 - P)
        rest = h & _LOW
        rank = (64 - P) - rest.bit_length() + 1
        if rank > regs[index]:
            regs[index] = rank
    return bytes(regs)


def merge(a: bytes | None, b: bytes | None) -> bytes:
    """Register-wise maximum (either may be None: nothing yet)."""
    if a is None:
        return b if b is not None else bytes(M)
    if b is None:
        return a
    if len(a) != M or len(b) != M:
        raise ValueError(f"registers must be {M} bytes")
    return np.maximum(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def estimate(regs: bytes) -> int:
    """Distinct users the registers hold (HyperLogLog, linear counting for small counts)."""
    if len(regs) != M:
        raise ValueError(f"registers must be {M} bytes")
    arr = np.frombuffer(regs, np.uint8)
    zeros = int(np.count_nonzero(arr == 0))
    raw = _ALPHA * M * M / float(np.sum(np.ldexp(1.0, -arr.astype(np.int64))))
    if raw <= 2.5 * M and zeros:
        return round(M * math.log(M / zeros))
    return round(raw)
