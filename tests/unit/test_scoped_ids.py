"""Ids scoped by source: distinct sources never share a wire id, retries always do, and the wire id
fits the schema whatever the caller's id."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.client import check_source, scoped_id
from pipeline.core.model import MAX_ID_CHARS, check_event
from pipeline.tiers.ingest import key_source

sources = st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True)
ids = st.text(min_size=1, max_size=MAX_ID_CHARS)


@given(sources, ids)
def test_a_scoped_id_is_deterministic_and_a_valid_wire_id(source: str, event_id: str) -> None:
    wire = scoped_id(source, event_id)
    assert wire == scoped_id(source, event_id)  # a retry meets its original
    assert wire.startswith(source + "/")
    fields = check_event({"type": "like", "key": "k", "id": wire}, frozenset({"like"}))
    assert fields[6] == wire


@given(sources, ids, sources, ids)
def test_different_source_or_id_gives_a_different_wire_id(s1: str, i1: str, s2: str, i2: str) -> None:
    if (s1, i1) != (s2, i2):
        assert scoped_id(s1, i1) != scoped_id(s2, i2)


def test_long_ids_are_digested_within_the_limit() -> None:
    long_id = "x" * MAX_ID_CHARS
    wire = scoped_id("a" * 40, long_id)
    assert len(wire) <= MAX_ID_CHARS and wire.startswith("a" * 40 + "/#")
    assert wire != scoped_id("a" * 40, long_id[:-1] + "y")


@pytest.mark.parametrize("bad", ["has/slash", "x" * 41, "sp ace", "é"])
def test_a_source_with_a_separator_or_too_long_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="source"):
        check_source(bad)


def test_an_api_keys_source_is_a_digest_not_the_key() -> None:
    label = key_source(b"secret-key-1")
    assert label == key_source(b"secret-key-1") != key_source(b"secret-key-2")
    assert "secret" not in label and check_source(label) == label
