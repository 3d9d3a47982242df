"""The gateway's OpenAPI Event schema is generated from the table the validator reads
(pipeline.core.model.EVENT_FIELDS): what one allows, the other accepts. The two mismatches
Schemathesis once found stay fixed."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.model import EVENT_FIELDS, InvalidEvent, check_event, event_json_schema
from pipeline.tiers.ingest import openapi_document
from topologies.live_likes import TOPOLOGY

TYPES = frozenset(TOPOLOGY.types)


def document() -> dict[str, Any]:
    return openapi_document(TOPOLOGY)


def test_the_documents_event_is_the_tables() -> None:
    assert document()["components"]["schemas"]["Event"] == event_json_schema(TYPES)
    assert list(event_json_schema(TYPES)["properties"]) == [f.name for f in EVENT_FIELDS]


def test_an_empty_batch_is_invalid_in_the_document_too() -> None:
    body = document()["paths"]["/v1/events"]["post"]["requestBody"]["content"]
    for media in ("application/json", "application/x-ndjson"):
        batch = body[media]["schema"]["oneOf"][0]
        assert batch["type"] == "array" and batch["minItems"] == 1


@pytest.mark.parametrize("spec", EVENT_FIELDS, ids=lambda s: s.name)
def test_null_is_allowed_exactly_where_the_validator_takes_it_as_absent(spec: Any) -> None:
    event: dict[str, Any] = {"type": "like", "key": "k", spec.name: None}
    schema = event_json_schema(TYPES)["properties"][spec.name]
    try:
        check_event(event, TYPES)
        accepted = True
    except InvalidEvent:
        accepted = False
    assert accepted == schema.get("nullable", False)


@pytest.mark.parametrize("spec", EVENT_FIELDS, ids=lambda s: s.name)
def test_each_limit_is_the_validators_limit(spec: Any) -> None:
    def ok(value: Any) -> bool:
        event: dict[str, Any] = {"type": "like", "key": "k", spec.name: value}
        try:
            check_event(event, TYPES)
        except InvalidEvent as exc:
            assert exc.field == spec.name
            return False
        return True

    if spec.type == "string":
        if spec.name == "type":
            return  # an enum of the topology's types
        assert ok("x" * spec.max_length) and not ok("x" * (spec.max_length + 1))
        assert ok("") == (not spec.min_length)
        assert not ok(1)
    else:
        assert ok(spec.maximum) and ok(spec.minimum)
        step = 1 if spec.type == "integer" else spec.maximum
        assert not ok(spec.maximum + step) and not ok(spec.minimum - step)
        assert not ok("1") and not ok(True)
        assert ok(1.5) == (spec.type == "number")
