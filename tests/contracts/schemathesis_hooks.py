"""Schemathesis hooks for the gateway (loaded with SCHEMATHESIS_HOOKS=tests.contracts.schemathesis_hooks).

The gateway's OpenAPI describes `application/x-ndjson` bodies with the same schema as JSON ones (a
batch of events, or one event); NDJSON writes each event of a batch on a line
of its own (by the standard library's encoder: generated numbers may exceed 64 bits).
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)
