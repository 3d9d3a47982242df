"""Wire format: event validation, message keys, and the inter-tier messages."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.model import (
    MAX_ABS_VALUE,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_KEY_CHARS,
    MAX_SUBKEYS,
    MAX_TEXT_CHARS,
    ChannelUpdate,
    Event,
    InvalidEvent,
    Partial,
    check_event,
    decode_event,
    explain_event,
    message_key,
    parse_message_key,
    validate_event,
)

TYPES = frozenset({"like", "comment"})


_DROP = object()  # marks a field to leave out


def base(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "like", "key": "c1", "channel": "v1", "ts": 1_700_000_000_000}
    obj.update(overrides)
    return {k: v for k, v in obj.items() if v is not _DROP}


# --------------------------------------------------------------------------- valid events


def test_minimal_event_gets_defaults() -> None:
    e = decode_event(b'{"type":"like","key":"c1"}', TYPES, default_ts_ms=42)
    assert e == Event(type="like", key="c1", channel="", ts_ms=42, value=1, user=None, id=None, sub=0)


def test_full_event_is_accepted_by_all_three_entry_points() -> None:
    obj = {
        "type": "comment",
        "key": "c9",
        "channel": "video-7",
        "ts": 123,
        "value": -2.5,
        "user": "u1",
        "id": "evt-1",
        "sub": MAX_SUBKEYS - 1,
    }
    expected = ("comment", "c9", "video-7", 123, -2.5, "u1", "evt-1", MAX_SUBKEYS - 1)
    assert check_event(obj, TYPES) == expected
    assert validate_event(obj, TYPES) == Event(*expected)
    assert decode_event(orjson.dumps(obj), TYPES) == Event(*expected)


def test_explicit_ts_wins_over_default_and_null_means_missing() -> None:
    assert check_event(base(ts=5), TYPES, default_ts_ms=99)[3] == 5
    assert check_event(base(ts=None), TYPES, default_ts_ms=99)[3] == 99
    assert check_event(base(ts=_DROP), TYPES, default_ts_ms=99)[3] == 99


def test_limits_are_inclusive() -> None:
    assert validate_event(base(key="k" * MAX_KEY_CHARS), TYPES).key == "k" * MAX_KEY_CHARS
    assert validate_event(base(id="i" * MAX_ID_CHARS), TYPES).id == "i" * MAX_ID_CHARS
    assert validate_event(base(value=MAX_ABS_VALUE), TYPES).value == MAX_ABS_VALUE
    assert validate_event(base(value=-MAX_ABS_VALUE), TYPES).value == -MAX_ABS_VALUE
    assert validate_event(base(ts=2**53 - 1), TYPES).ts_ms == 2**53 - 1
    assert validate_event(base(ts=0), TYPES).ts_ms == 0
    assert validate_event(base(sub=0), TYPES).sub == 0


def test_any_type_accepted_when_types_not_given() -> None:
    assert validate_event(base(type="whatever")).type == "whatever"


def test_raw_at_exactly_the_size_limit_is_accepted() -> None:
    head = orjson.dumps(base())
    # Pad with insignificant whitespace up to the limit.
    raw = head + b" " * (MAX_EVENT_BYTES - len(head))
    assert len(raw) == MAX_EVENT_BYTES
    assert decode_event(raw, TYPES).key == "c1"


# --------------------------------------------------------------------------- invalid events

# (object, field the reason must name)
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("missing type", base(type=_DROP), "type"),
    ("empty type", base(type=""), "type"),
    ("type not string", base(type=3), "type"),
    ("unknown type", base(type="dislike"), "type"),
    ("missing key", base(key=_DROP), "key"),
    ("null key", base(key=None), "key"),
    ("empty key", base(key=""), "key"),
    ("key int", base(key=12), "key"),
    ("key list", base(key=["a"]), "key"),
    ("key too long", base(key="k" * (MAX_KEY_CHARS + 1)), "key"),
    ("value string", base(value="3"), "value"),
    ("value bool", base(value=True), "value"),
    ("value null", base(value=None), "value"),
    ("value huge", base(value=MAX_ABS_VALUE * 10), "value"),
    ("value huge negative", base(value=-MAX_ABS_VALUE - 1), "value"),
    ("value huge int", base(value=2**63), "value"),
    ("ts float", base(ts=1.5), "ts"),
    ("ts integral float", base(ts=1000.0), "ts"),
    ("ts string", base(ts="1000"), "ts"),
    ("ts bool", base(ts=True), "ts"),
    ("ts negative", base(ts=-1), "ts"),
    ("ts too large", base(ts=2**53), "ts"),
    ("sub negative", base(sub=-1), "sub"),
    ("sub too large", base(sub=MAX_SUBKEYS), "sub"),
    ("sub float", base(sub=1.0), "sub"),
    ("sub bool", base(sub=True), "sub"),
    ("sub string", base(sub="1"), "sub"),
    ("channel int", base(channel=7), "channel"),
    ("channel too long", base(channel="c" * (MAX_KEY_CHARS + 1)), "channel"),
    ("user int", base(user=7), "user"),
    ("user dict", base(user={"id": 1}), "user"),
    ("user too long", base(user="u" * (MAX_KEY_CHARS + 1)), "user"),
    ("id too long", base(id="i" * (MAX_ID_CHARS + 1)), "id"),
    ("id int", base(id=5), "id"),
    ("id empty", base(id=""), "id"),
    # the commonest shape, {"type", "key", "channel"}, has a shortcut of its own
    ("plain: key too long", base(ts=_DROP, key="k" * (MAX_KEY_CHARS + 1)), "key"),
    ("plain: key empty", base(ts=_DROP, key=""), "key"),
    ("plain: key int", base(ts=_DROP, key=1), "key"),
    ("plain: channel too long", base(ts=_DROP, channel="c" * (MAX_KEY_CHARS + 1)), "channel"),
    ("plain: channel int", base(ts=_DROP, channel=1), "channel"),
    ("plain: unknown type", base(ts=_DROP, type="dislike"), "type"),
    ("text int", base(text=5), "text"),
    ("text too long", base(text="t" * (MAX_TEXT_CHARS + 1)), "text"),
]


@pytest.mark.parametrize(
    ("obj", "field"), [(o, f) for _, o, f in BAD_FIELDS], ids=[n for n, _, _ in BAD_FIELDS]
)
def test_bad_field_is_rejected_naming_the_field(obj: dict[str, Any], field: str) -> None:
    for check in (
        lambda: check_event(obj, TYPES),
        lambda: validate_event(obj, TYPES),
        lambda: decode_event(orjson.dumps(obj), TYPES),
    ):
        with pytest.raises(InvalidEvent) as info:
            check()
        assert info.value.field == field
        assert re.search(rf"\b{field}\b", info.value.reason), info.value.reason
        assert str(info.value) == info.value.reason


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"hello", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"type":"like","key":"c1","value":NaN}', "not valid JSON"),
        (b'{"type":"like","key":"c1","value":Infinity}', "not valid JSON"),
        (b'{"type":"like","key":"c1","value":-Infinity}', "not valid JSON"),
        (b'{"type":"like","key":"c1","value":1e400}', "not valid JSON"),
        (b"[]", "JSON object"),
        (b'["like","c1"]', "JSON object"),
        (b"1", "JSON object"),
        (b"null", "JSON object"),
        (b'"like"', "JSON object"),
    ],
)
def test_undecodable_raw_is_rejected(raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw, TYPES)
    assert fragment in info.value.reason
    assert info.value.field is None


def test_oversized_raw_is_rejected_before_parsing() -> None:
    raw = orjson.dumps(base()) + b" " * MAX_EVENT_BYTES
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw, TYPES)
    assert str(MAX_EVENT_BYTES) in info.value.reason
    assert "byte" in info.value.reason
    # even garbage that is too big is reported as too big, not as bad JSON
    with pytest.raises(InvalidEvent, match="byte limit"):
        decode_event(b"x" * (MAX_EVENT_BYTES + 1), TYPES)


@pytest.mark.parametrize("obj", [None, [], "x", 1, 1.5, True, ("like", "c1")])
def test_non_object_rejected_by_check_event(obj: Any) -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        check_event(obj, TYPES)


def test_unknown_type_reason_is_bounded() -> None:
    with pytest.raises(InvalidEvent) as info:
        check_event(base(type="x" * 200), TYPES)
    assert len(info.value.reason) < 120


# --------------------------------------------------------------------------- properties

# Each field: left out, or a value that may or may not be valid.
field_values: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["like", "comment", "", "dislike", 1, None, ["like"]]),
    "key": st.one_of(
        st.sampled_from(["", "k" * MAX_KEY_CHARS, "k" * (MAX_KEY_CHARS + 1), 5, None, True]),
        st.text(max_size=5),
    ),
    "channel": st.sampled_from(["", "v", "c" * (MAX_KEY_CHARS + 1), None, 3, ["v"]]),
    "user": st.sampled_from(["", "u", "u" * (MAX_KEY_CHARS + 1), None, 3]),
    "id": st.sampled_from(["", "i", "i" * MAX_ID_CHARS, "i" * (MAX_ID_CHARS + 1), None, 3]),
    "ts": st.one_of(st.sampled_from([None, -1, 0, 2**53 - 1, 2**53, 1.0, "1", True]), st.integers(0, 10**13)),
    "value": st.one_of(
        st.sampled_from([None, "1", True, False, MAX_ABS_VALUE, -MAX_ABS_VALUE, MAX_ABS_VALUE * 2, 2**63]),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    "sub": st.sampled_from([None, -1, 0, 1, MAX_SUBKEYS - 1, MAX_SUBKEYS, 1.0, True, "1"]),
    "text": st.sampled_from([None, "", "hi", "t" * 2000, "t" * 2001, 5]),
}


SHAPES = [("type", "key", "channel"), ("type", "key"), ("type", "key", "channel", "ts"), tuple(field_values)]


@st.composite
def event_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly the common shapes (which check_event has shortcuts for), else any subset of fields."""
    names = draw(st.one_of(st.sampled_from(SHAPES), st.sets(st.sampled_from(list(field_values)))))
    return {name: draw(field_values[name]) for name in names}


def outcome(check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except InvalidEvent as exc:
        return ("invalid", exc.reason, exc.field)


@settings(max_examples=200)
@given(obj=event_objects(), default_ts=st.integers(0, 2**40))
def test_fast_check_has_the_same_verdict_as_the_explaining_check(
    obj: dict[str, Any], default_ts: int
) -> None:
    fast = outcome(check_event, obj, TYPES, default_ts)
    slow = outcome(explain_event, obj, TYPES, default_ts)
    assert fast == slow
    assert outcome(check_event, obj, None, default_ts) == outcome(explain_event, obj, None, default_ts)


keys = st.text(
    min_size=1,
    max_size=40,
    alphabet=st.one_of(st.sampled_from("\xff#:\x00\u00ff\U0001f600"), st.characters(codec="utf-8")),
)
any_keys = st.text(
    max_size=40, alphabet=st.one_of(st.sampled_from("\xff#:\x00"), st.characters(codec="utf-8"))
)
subs = st.integers(min_value=0, max_value=MAX_SUBKEYS - 1)


@settings(max_examples=200)
@given(key=any_keys, sub=subs)
def test_message_key_round_trips(key: str, sub: int) -> None:
    raw = message_key(key, sub)
    assert isinstance(raw, bytes)
    assert parse_message_key(raw) == (key, sub)


@settings(max_examples=200)
@given(k1=any_keys, k2=any_keys, sub=st.integers(min_value=1, max_value=MAX_SUBKEYS - 1))
def test_user_key_never_looks_like_a_sub_key(k1: str, k2: str, sub: int) -> None:
    assert message_key(k1, 0) != message_key(k2, sub)
    assert message_key(k1) == message_key(k1, 0) == k1.encode()


@settings(max_examples=200)
@given(k1=any_keys, s1=subs, k2=any_keys, s2=subs)
def test_message_keys_are_injective(k1: str, s1: int, k2: str, s2: int) -> None:
    if (k1, s1) != (k2, s2):
        assert message_key(k1, s1) != message_key(k2, s2)


events = st.builds(
    Event,
    type=st.sampled_from(sorted(TYPES)),
    key=keys.filter(lambda k: len(k) <= MAX_KEY_CHARS),
    channel=st.text(max_size=20),
    ts_ms=st.integers(min_value=0, max_value=2**53 - 1),
    value=st.one_of(
        st.integers(min_value=-(10**15), max_value=10**15),
        st.floats(min_value=-MAX_ABS_VALUE, max_value=MAX_ABS_VALUE, allow_nan=False),
    ),
    user=st.none() | st.text(max_size=20),
    id=st.none() | st.text(min_size=1, max_size=MAX_ID_CHARS),
    sub=subs,
    text=st.none() | st.text(max_size=20),
)


@settings(max_examples=200)
@given(event=events)
def test_event_json_round_trips_through_decode(event: Event) -> None:
    assert decode_event(event.to_json(), TYPES) == event


# --------------------------------------------------------------------------- inter-tier messages


def test_partial_round_trip_with_distinct_sets() -> None:
    partial = Partial(
        source_partition=3,
        root_partition=1,
        window=17,
        first_offset=100,
        last_offset=250,
        cells={
            (0, "video", "c1", "total"): 12,
            (0, "", "c#:\xff", "60:120"): 3,
            (1, "video", "c1", "total"): -2.5,
            (2, "video", "c2", "total"): {"u2", "u1", "ü"},
            (2, "video", "c3", "60:60"): set(),
        },
        events=40,
        late_dropped=2,
        dead=1,
    )
    for version in (1, 2):
        raw = partial.to_json(version=version)
        back = Partial.from_json(raw, frozenset({2}))
        assert back == partial
        assert isinstance(back.cells[(2, "video", "c2", "total")], set)
        # the same bytes decode the same way every time
        assert Partial.from_json(raw, frozenset({2})).to_json(version=version) == raw
    assert partial.to_json() == partial.to_json(version=2)
    # distinct members are serialised in a stable (sorted) order
    assert orjson.loads(partial.to_json(version=1))["cells"][3][4] == ["u1", "u2", "ü"]
    groups = orjson.loads(partial.to_json())["groups"]
    assert [2, "video", "total", ["c2"], [["u1", "u2", "ü"]]] in groups
    # v2: one group per (metric, channel, bucket), its keys and values in two lists
    assert sorted(tuple(g[:3]) for g in groups) == [
        (0, "", "60:120"),
        (0, "video", "total"),
        (1, "video", "total"),
        (2, "video", "60:60"),
        (2, "video", "total"),
    ]


def test_partial_without_distinct_metrics_declared_keeps_lists() -> None:
    partial = Partial(0, 0, 1, 0, 0, {(2, "c", "k", "total"): {"a"}})
    back = Partial.from_json(partial.to_json())
    assert back.cells[(2, "c", "k", "total")] == ["a"]


@pytest.mark.parametrize("version", [None, 0, 3, "1", "2"])
def test_partial_rejects_other_versions(version: Any) -> None:
    obj = orjson.loads(Partial(0, 0, 1, 0, 0, {}).to_json())
    if version is None:
        del obj["v"]
    else:
        obj["v"] = version
    with pytest.raises(ValueError, match="version"):
        Partial.from_json(orjson.dumps(obj))


@settings(max_examples=100)
@given(
    cells=st.dictionaries(
        st.tuples(
            st.integers(0, 3),
            st.text(max_size=8),
            st.text(min_size=1, max_size=8),
            st.sampled_from(["total", "60:0", "60:60", "3600:0"]),
        ),
        st.integers(min_value=-(2**53), max_value=2**53),
        max_size=10,
    ),
    sets=st.dictionaries(
        st.tuples(st.just(4), st.text(max_size=8), st.text(min_size=1, max_size=8), st.just("total")),
        st.sets(st.text(max_size=8), max_size=5),
        max_size=5,
    ),
    counters=st.tuples(*[st.integers(min_value=0, max_value=2**40)] * 8),
)
def test_partial_round_trip_property(
    cells: dict[Any, Any], sets: dict[Any, Any], counters: tuple[int, ...]
) -> None:
    src, root, win, first, last, events, dead, dup = counters
    partial = Partial(src, root, win, first, last, {**cells, **sets}, events, 3, dead, duplicates=dup)
    assert Partial.from_json(partial.to_json(), frozenset({4})) == partial


def test_partial_from_older_writer_without_duplicates_field() -> None:
    obj = orjson.loads(Partial(1, 2, 3, 4, 5, {(0, "c", "k", "total"): 1}, 6, 7, 8, duplicates=9).to_json())
    del obj["dup"]
    back = Partial.from_json(orjson.dumps(obj))
    assert back == Partial(1, 2, 3, 4, 5, {(0, "c", "k", "total"): 1}, 6, 7, 8, duplicates=0)


def test_channel_update_round_trip() -> None:
    update = ChannelUpdate(
        "video:1", 7, 1_700_000_000_123, [("likes", "c1", 10), ("amount", "c#2", 2.5), ("likes", "ü", 0)]
    )
    raw = update.to_json()
    assert orjson.loads(raw)["v"] == 1
    back = ChannelUpdate.from_json(raw)
    assert back == update
    assert all(isinstance(v, tuple) for v in back.values)


def test_channel_update_default_values_are_independent() -> None:
    a = ChannelUpdate("a", 1, 0)
    b = ChannelUpdate("b", 1, 0)
    a.values.append(("m", "k", 1))
    assert b.values == []
    assert ChannelUpdate.from_json(b.to_json()) == b


@given(st.integers(1, 3000), st.integers(300, 20_000), st.integers(0, 50))
def test_a_partial_over_the_limit_splits_into_chunks_that_merge_to_the_whole(
    cells: int, max_bytes: int, events: int
) -> None:
    partial = Partial(
        2,
        1,
        7,
        100,
        400,
        {(0, f"ch{i % 7}", f"key-{i}", "total"): i + 1 for i in range(cells)},
        events=events,
        late_dropped=3,
        dead=2,
        duplicates=1,
    )
    messages = partial.encode(max_bytes)
    assert (
        all(len(m) <= max_bytes for m in messages) or len(messages) == cells
    )  # one cell per message at worst
    chunks = [Partial.from_json(m) for m in messages]
    assert {
        (c.source_partition, c.root_partition, c.window, c.first_offset, c.last_offset) for c in chunks
    } == {(2, 1, 7, 100, 400)}
    merged: dict[Any, Any] = {}
    for c in chunks:
        assert not set(merged) & set(c.cells)  # every cell in exactly one chunk
        merged.update(c.cells)
    assert merged == partial.cells
    assert sum(c.events for c in chunks) == events and sum(c.dead for c in chunks) == 2
    assert sum(c.late_dropped for c in chunks) == 3 and sum(c.duplicates for c in chunks) == 1
    if len(partial.to_json()) <= max_bytes:
        assert messages == [partial.to_json()]
