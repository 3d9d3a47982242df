"""HyperLogLog registers for distinct users in PostgreSQL: merging is a union, estimates are close."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.core import hll

users = st.sets(st.text(min_size=1, max_size=12), max_size=200)


@given(users, users, users)
def test_merging_registers_is_the_registers_of_the_union(a: set[str], b: set[str], c: set[str]) -> None:
    ra, rb, rc = hll.registers(a), hll.registers(b), hll.registers(c)
    assert hll.merge(ra, rb) == hll.registers(a | b)
    assert hll.merge(hll.merge(ra, rb), rc) == hll.merge(ra, hll.merge(rb, rc))  # any grouping
    assert hll.merge(ra, ra) == ra  # idempotent: a delta applied twice counts once
    assert hll.merge(None, ra) == ra == hll.merge(ra, None)


def test_small_sets_are_counted_exactly_and_large_ones_closely() -> None:
    for n in (0, 1, 2, 11, 50):
        assert hll.estimate(hll.registers(f"user-{i}" for i in range(n))) == n
    for n in (1_000, 20_000, 200_000):
        got = hll.estimate(hll.registers(f"user-{i}" for i in range(n)))
        assert abs(got - n) <= 0.05 * n, (n, got)  # standard error 1.6 %; 5 % is 3 sigma


def test_registers_are_fixed_size() -> None:
    assert len(hll.registers(["a", "b"])) == hll.M == 4096
    try:
        hll.estimate(b"\\x00")
    except ValueError:
        return
    raise AssertionError("short registers accepted")
