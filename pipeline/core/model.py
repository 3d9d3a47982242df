"""Wire format: events in, partial aggregates between tiers, merged updates out.

Everything that crosses a topic is defined here, with its version, so that the
tiers and the dashboards agree on one contract (docs/CONTRACT.md). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import orjson

FORMAT_VERSION = 1
# partials (T.partials) are at v2: cells grouped by (metric, channel, bucket); roots read v1 and v2
PARTIAL_VERSION = 2

MAX_EVENT_BYTES = 64 * 1024
MAX_KEY_CHARS = 256
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 2000
MAX_SUBKEYS = 1024
MAX_TS = 2**53  # event times are integers JSON and JavaScript carry exactly
MAX_ABS_VALUE = 1e15

# Kafka message keys of sub-keys start with 0xFF, a byte that never occurs in
# UTF-8, so no user key (whatever characters it holds) can look like a sub-key.
SUBKEY_MARK = b"\xff"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of the v1 event: what the validator checks and what the published schemas say.

    `EVENT_FIELDS` is the one table both read: `explain_event` checks each field by it, and
    `event_json_schema` (the gateway's OpenAPI, docs/asyncapi.yaml) is generated from it, so the
    validator and the contracts cannot drift (tests/unit/test_event_schema.py holds them equal).
    `nullable`: JSON null is taken as the field left out. Lengths count characters (code points);
    `maximum` is inclusive.
    """

    name: str
    type: str  # "string", "integer" or "number"
    description: str
    required: bool = False
    nullable: bool = False
    min_length: int | None = None
    max_length: int | None = None
    minimum: float | None = None
    maximum: float | None = None

    def schema(self) -> dict[str, Any]:
        """This field as a JSON Schema (OpenAPI 3.0 dialect: `nullable`)."""
        out: dict[str, Any] = {"type": self.type, "description": self.description}
        if self.nullable:
            out["nullable"] = True
        for key, value in (
            ("minLength", self.min_length),
            ("maxLength", self.max_length),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
        ):
            if value is not None:
                out[key] = value
        return out


EVENT_FIELDS: tuple[FieldSpec, ...] = (  # in the order they are checked
    FieldSpec(
        "type",
        "string",
        "event type, one the topology declares",
        required=True,
        min_length=1,
        max_length=MAX_KEY_CHARS,
    ),
    FieldSpec("key", "string", "what is counted", required=True, min_length=1, max_length=MAX_KEY_CHARS),
    FieldSpec(
        "channel",
        "string",
        'what viewers subscribe to; "" if absent',
        nullable=True,
        max_length=MAX_KEY_CHARS,
    ),
    FieldSpec("user", "string", "for distinct-user metrics", nullable=True, max_length=MAX_KEY_CHARS),
    FieldSpec(
        "id",
        "string",
        "idempotency id: a repeat within the dedup horizon is counted once; generated if absent",
        nullable=True,
        min_length=1,
        max_length=MAX_ID_CHARS,
    ),
    FieldSpec(
        "text",
        "string",
        "comment text, forwarded to viewers for feed types",
        nullable=True,
        max_length=MAX_TEXT_CHARS,
    ),
    FieldSpec(
        "ts",
        "integer",
        "event time, ms since the epoch; the time of the send if absent. A retry carries its original's ts",
        nullable=True,
        minimum=0,
        maximum=MAX_TS - 1,
    ),
    FieldSpec(
        "value",
        "number",
        "for sum, min and max metrics; 1 if absent",
        minimum=-MAX_ABS_VALUE,
        maximum=MAX_ABS_VALUE,
    ),
    FieldSpec(
        "sub",
        "integer",
        "hot-key sub-key; chosen from the split history at ts if absent. A retry carries its original's sub",
        minimum=0,
        maximum=MAX_SUBKEYS - 1,
    ),
)
FIELDS: dict[str, FieldSpec] = {f.name: f for f in EVENT_FIELDS}


def event_json_schema(types: frozenset[str] | None = None, *, nullable: str = "openapi") -> dict[str, Any]:
    """The v1 event as a JSON Schema object, from `EVENT_FIELDS`.

    `nullable="openapi"` marks nullable fields the OpenAPI 3.0 way; `"type-list"` as JSON Schema
    proper (`"type": ["string", "null"]`, what AsyncAPI 3 uses). Other properties are allowed
    (ignored by the pipeline: forward compatible).
    """
    properties: dict[str, Any] = {}
    for spec in EVENT_FIELDS:
        prop = spec.schema()
        if spec.name == "type" and types is not None:
            prop["enum"] = sorted(types)
        if spec.nullable and nullable != "openapi":
            del prop["nullable"]
            prop["type"] = [spec.type, "null"]
            if "enum" in prop:
                prop["enum"].append(None)
        properties[spec.name] = prop
    return {
        "type": "object",
        "required": [f.name for f in EVENT_FIELDS if f.required],
        "properties": properties,
        "description": f"one event (format v{FORMAT_VERSION}); other fields are ignored",
    }


class InvalidEvent(ValueError):
    """An event that can never be counted; it goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted event, after validation."""

    type: str
    key: str
    channel: str = ""
    ts_ms: int = 0
    value: float = 1
    user: str | None = None
    id: str | None = None
    sub: int = 0
    text: str | None = None

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {"type": self.type, "key": self.key}
        if self.channel:
            obj["channel"] = self.channel
        if self.ts_ms:
            obj["ts"] = self.ts_ms
        if self.value != 1:
            obj["value"] = self.value
        if self.user is not None:
            obj["user"] = self.user
        if self.id is not None:
            obj["id"] = self.id
        if self.sub:
            obj["sub"] = self.sub
        if self.text is not None:
            obj["text"] = self.text
        return orjson.dumps(obj)


def message_key(key: str, sub: int = 0) -> bytes:
    """The Kafka message key an event is partitioned by: the key, or a marked sub-key."""
    if not sub:
        return key.encode()
    return SUBKEY_MARK + str(sub).encode() + SUBKEY_MARK + key.encode()


def parse_message_key(raw: bytes) -> tuple[str, int]:
    """Inverse of `message_key`: (key, sub)."""
    if raw[:1] != SUBKEY_MARK:
        return raw.decode(), 0
    end = raw.index(SUBKEY_MARK, 1)
    return raw[end + 1 :].decode(), int(raw[1:end])


EventFields = tuple[str, str, str, int, float, str | None, str | None, int]


def _field(obj: dict[str, Any], spec: FieldSpec) -> Any:
    """The value of one field checked against its spec; None when absent (or null and nullable)."""
    name = spec.name
    value = obj.get(name)
    if value is None:
        if spec.required:
            raise InvalidEvent(f"missing field '{name}'", name)
        if spec.nullable or name not in obj:
            return None
    kind = spec.type
    if kind == "string":
        if type(value) is not str:
            raise InvalidEvent(f"field '{name}' must be a string, got {type(value).__name__}", name)
        if spec.min_length and len(value) < spec.min_length:
            if name == "id":  # "" is no id: taking it for one would count every event that sends it once
                raise InvalidEvent("field 'id' must not be empty (leave it out to have one generated)", name)
            raise InvalidEvent(f"field '{name}' must not be empty", name)
        if spec.max_length is not None and len(value) > spec.max_length:
            raise InvalidEvent(f"field '{name}' is longer than {spec.max_length} characters", name)
        return value
    low, high = spec.minimum, spec.maximum
    if kind == "integer":
        if type(value) is not int:
            raise InvalidEvent(f"field '{name}' must be an integer in [{low:.0f}, {high:.0f}]", name)
    elif type(value) is not int and type(value) is not float:
        raise InvalidEvent(f"field '{name}' must be a number", name)
    if not ((low is None or low <= value) and (high is None or value <= high)):  # also false for NaN
        if kind == "number":
            raise InvalidEvent(f"field '{name}' must be finite and within [{low:g}, {high:g}]", name)
        raise InvalidEvent(f"field '{name}' is out of range [{low:.0f}, {high:.0f}]", name)
    return value


def check_event(obj: Any, types: frozenset[str] | None = None, default_ts_ms: int = 0) -> EventFields:
    """Check a decoded event against the v1 schema; raise InvalidEvent naming the field.

    Returns a plain tuple (type, key, channel, ts_ms, value, user, id, sub).
    This runs once per event on tier 1's hot path: well-formed events pass one
    inline test; anything else goes to `explain_event`, which has the same
    verdict (a property test holds them equal) and says what is wrong.
    """
    if type(obj) is dict and types is not None:
        get = obj.get
        etype = get("type")
        key = get("key")
        channel = get("channel")
        # the commonest shape, {"type", "key", "channel"} and nothing else, checked in one go
        if (
            len(obj) == 3
            and type(channel) is str
            and type(etype) is str
            and type(key) is str
            and etype in types
            and 0 < len(key) <= MAX_KEY_CHARS
            and len(channel) <= MAX_KEY_CHARS
        ):
            return etype, key, channel, default_ts_ms, 1, None, None, 0
        if channel is None:
            channel = ""
        user = get("user")
        event_id = get("id")
        ts = get("ts")
        value = get("value", 1)
        sub = get("sub", 0)
        text = get("text")
        if (
            type(etype) is str
            and etype in types
            and type(key) is str
            and 0 < len(key) <= MAX_KEY_CHARS
            and type(channel) is str
            and len(channel) <= MAX_KEY_CHARS
            and (user is None or (type(user) is str and len(user) <= MAX_KEY_CHARS))
            and (event_id is None or (type(event_id) is str and 0 < len(event_id) <= MAX_ID_CHARS))
            and (ts is None or (type(ts) is int and 0 <= ts < MAX_TS))
            and (type(value) is int or type(value) is float)
            and -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE
            and type(sub) is int
            and 0 <= sub < MAX_SUBKEYS
            and (text is None or (type(text) is str and len(text) <= MAX_TEXT_CHARS))
        ):
            return etype, key, channel, default_ts_ms if ts is None else ts, value, user, event_id, sub
    return explain_event(obj, types, default_ts_ms)


def explain_event(obj: Any, types: frozenset[str] | None = None, default_ts_ms: int = 0) -> EventFields:
    """The field-by-field check behind `check_event`, by `EVENT_FIELDS`: slower, and names what is wrong."""
    if type(obj) is not dict:
        raise InvalidEvent(f"event must be a JSON object, got {type(obj).__name__}")
    values = []
    for spec in EVENT_FIELDS:
        values.append(_field(obj, spec))
        if spec.name == "type" and types is not None and values[0] not in types:
            raise InvalidEvent(f"unknown event type '{values[0][:64]}'", "type")
    etype, key, channel, user, event_id, _text, ts, value, sub = values
    return (
        etype,
        key,
        channel or "",
        default_ts_ms if ts is None else ts,
        1 if value is None else value,
        user,
        event_id,
        sub or 0,
    )


def validate_event(obj: Any, types: frozenset[str] | None = None, default_ts_ms: int = 0) -> Event:
    """Like `check_event`, as an Event (for the SDK and the gateway)."""
    text = obj.get("text") if isinstance(obj, dict) else None
    return Event(*check_event(obj, types, default_ts_ms), text=text)


def decode_event(raw: bytes, types: frozenset[str] | None = None, default_ts_ms: int = 0) -> Event:
    """Bytes from the events topic to a validated Event, or InvalidEvent with a reason."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(raw)} bytes, over the {MAX_EVENT_BYTES} byte limit")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    return validate_event(obj, types, default_ts_ms)


# A cell is one aggregate: (metric index, channel, key, bucket). Its value's
# type depends on the metric's kind (int/float for count, sum, min, max;
# a set of user ids for distinct).
Cell = tuple[int, str, str, str]


@dataclass(slots=True)
class Partial:
    """What a tier-1 worker sends the root for one window, one source partition, one root partition."""

    source_partition: int
    root_partition: int
    window: int
    first_offset: int
    last_offset: int
    cells: dict[Cell, Any]
    events: int = 0
    late_dropped: int = 0
    dead: int = 0
    duplicates: int = 0

    def to_json(self, version: int = PARTIAL_VERSION) -> bytes:
        """The partial's message: format v2 (cells grouped by metric, channel and bucket) unless told
        v1 (a list per cell, what roots before v2 read)."""
        head: dict[str, Any] = {
            "v": version,
            "src": self.source_partition,
            "root": self.root_partition,
            "win": self.window,
            "first": self.first_offset,
            "last": self.last_offset,
            "events": self.events,
            "late": self.late_dropped,
            "dead": self.dead,
            "dup": self.duplicates,
        }
        if version == 1:
            head["cells"] = [
                [m, ch, k, b, sorted(v) if isinstance(v, set) else v]
                for (m, ch, k, b), v in self.cells.items()
            ]
            return orjson.dumps(head)
        if version != PARTIAL_VERSION:
            raise ValueError(f"no partial format version {version!r}")
        # v2: one [metric, channel, bucket, [keys], [values]] per group, so that a cell costs its key and
        # its value only, on both sides (the root merges and plans a group's keys in bulk)
        groups: dict[tuple[int, str, str], tuple[list[str], list[Any]]] = {}
        for (m, ch, k, b), v in self.cells.items():
            g = groups.get((m, ch, b))
            if g is None:
                g = groups[(m, ch, b)] = ([], [])
            g[0].append(k)
            g[1].append(sorted(v) if isinstance(v, set) else v)
        head["groups"] = [[m, ch, b, keys, values] for (m, ch, b), (keys, values) in groups.items()]
        return orjson.dumps(head)

    def encode(self, max_bytes: int) -> list[bytes]:
        """The partial as messages of at most `max_bytes` each: one, or its cells split over several.

        A broker refuses a message over its `max.message.bytes` (about 1 MB by default on Apache
        Kafka), and a window may hold 200,000 cells. Each chunk is a partial of the same window and
        ranges with a share of the cells; the counters (events, late, dead, dup) ride on the first
        only, so merging the chunks gives the same as merging the whole. The root applies each chunk
        as the message it is, at its own offset, so exactly-once is unchanged.
        """
        raw = self.to_json()
        if len(raw) <= max_bytes or len(self.cells) <= 1:
            return [raw]
        items = list(self.cells.items())
        pieces = min(len(items), -(-len(raw) * 5 // (max_bytes * 4)))  # ceil(size / (0.8 * max))
        step = -(-len(items) // pieces)
        out: list[bytes] = []
        for n, start in enumerate(range(0, len(items), step)):
            chunk = Partial(
                self.source_partition,
                self.root_partition,
                self.window,
                self.first_offset,
                self.last_offset,
                dict(items[start : start + step]),
                *((self.events, self.late_dropped, self.dead, self.duplicates) if n == 0 else (0, 0, 0, 0)),
            )
            out.extend(chunk.encode(max_bytes))  # a chunk of unusually long cells splits again
        return out

    @classmethod
    def from_json(cls, raw: bytes, distinct_metrics: frozenset[int] = frozenset()) -> Partial:
        """A partial message of format v1 or v2."""
        return cls.from_obj(orjson.loads(raw), distinct_metrics)

    @classmethod
    def from_obj(cls, obj: dict[str, Any], distinct_metrics: frozenset[int] = frozenset()) -> Partial:
        """A partial from its decoded message (v1 or v2)."""
        version = obj.get("v")
        cells: dict[Cell, Any] = {}
        if version == PARTIAL_VERSION:
            for m, ch, b, keys, values in obj["groups"]:
                if type(keys) is not list or type(values) is not list or len(keys) != len(values):
                    raise ValueError("a group's keys and values must be lists of one length")
                if m in distinct_metrics:
                    values = [set(v) for v in values]
                cells.update(zip(zip(repeat(m), repeat(ch), keys, repeat(b)), values, strict=True))
        elif version == 1:
            for m, ch, k, b, v in obj["cells"]:
                cells[(m, ch, k, b)] = set(v) if m in distinct_metrics else v
        else:
            raise ValueError(f"unsupported partial format version {version!r}")
        return cls(
            obj["src"],
            obj["root"],
            obj["win"],
            obj["first"],
            obj["last"],
            cells,
            obj["events"],
            obj["late"],
            obj["dead"],
            obj.get("dup", 0),
        )


@dataclass(slots=True)
class ChannelUpdate:
    """Absolute totals for one channel after an apply of root partition `root`, for the broadcast tier.
    `seq` counts the applies of that root partition that touched the channel (layout 2: each root
    partition keeps its own sequence; a channel's is their sum)."""

    channel: str
    seq: int
    ts_ms: int
    values: list[tuple[str, str, float]] = field(default_factory=list)  # (metric, key, total)
    root: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": FORMAT_VERSION,
                "channel": self.channel,
                "root": self.root,
                "seq": self.seq,
                "ts": self.ts_ms,
                "values": self.values,  # each (metric, key, total) an array
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> ChannelUpdate:
        obj = orjson.loads(raw)
        return cls(
            obj["channel"], obj["seq"], obj["ts"], [tuple(v) for v in obj["values"]], obj.get("root", 0)
        )
