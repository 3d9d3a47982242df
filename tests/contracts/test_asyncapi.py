"""docs/asyncapi.yaml, the topics and the viewer protocol as AsyncAPI 3, checked by the AsyncAPI
parser (`@asyncapi/parser`, the library behind `asyncapi validate`; ops/_setup.sh installs it into
ops/asyncapi/node_modules). Its Event schema is the one the validator reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.core.model import event_json_schema

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.yaml"
VALIDATOR = ROOT / "ops" / "asyncapi" / "validate.mjs"


def validate(path: Path) -> tuple[int, dict[str, Any]]:
    node = shutil.which("node")
    if node is None or not (VALIDATOR.parent / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail("node or @asyncapi/parser is missing: run ops/_setup.sh (it installs both)")
    run = subprocess.run([node, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    assert run.stdout, run.stderr
    return run.returncode, orjson.loads(run.stdout)


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    code, out = validate(DOC)
    assert code == 0 and out["errors"] == [], out["errors"]
    assert out["warnings"] == [], out["warnings"]
    doc = out["document"]
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    for topic in ("events", "partials", "updates", "feed", "dead-letters", "splits", "dedup"):
        assert "{topology}." + topic in addresses
    assert {"/v1/ws", "/v1/sse"} <= addresses
    viewer = set(doc["channels"]["viewerWebSocket"]["messages"])
    assert viewer == {"snapshot", "update", "comments", "redirect", "error", "subscribe", "unsubscribe"}


def test_its_event_schema_is_the_validators() -> None:
    _, out = validate(DOC)
    schema = out["document"]["components"]["schemas"]["Event"]
    schema.pop("x-parser-schema-id", None)
    for prop in schema["properties"].values():
        prop.pop("x-parser-schema-id", None)
    assert schema == event_json_schema(nullable="type-list")


def test_the_validator_finds_errors(tmp_path: Path) -> None:
    """The check is real: a dangling reference and an unknown operation action are errors."""
    text = DOC.read_text()
    broken = text.replace('{$ref: "#/components/messages/Split"}', '{$ref: "#/components/messages/Nope"}')
    broken = broken.replace("action: send", "action: publish", 1)
    assert broken != text
    (tmp_path / "broken.yaml").write_text(broken)
    code, out = validate(tmp_path / "broken.yaml")
    assert code == 1 and out["errors"], out
