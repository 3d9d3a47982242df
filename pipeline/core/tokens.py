"""Viewer tokens: signed, expiring, scoped to channels. Sans-I/O (the caller passes `now`).

A token is `b64url(payload_json) + "." + b64url(HMAC-SHA256(secret, b64url(payload_json)))`
with payload `{"sub": viewer_id, "channels": [...] or ["*"], "exp": unix_seconds}`; base64url
without padding, as in JWTs. The pages and any backend that mints tokens only need this
one line of crypto, so there is no JWT library and no algorithm field to get wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

ALL_CHANNELS = "*"
MAX_TOKEN_CHARS = 8192

# Reasons a token is refused; they are the `reason` label of the refusals metric.
MISSING = "missing"
MALFORMED = "malformed"
BAD_SIGNATURE = "bad_signature"
EXPIRED = "expired"
OUT_OF_SCOPE = "out_of_scope"


class TokenRefused(ValueError):
    """The viewer may not connect (or subscribe); `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token grants."""

    viewer: str
    channels: frozenset[str]
    expires: int

    def allows(self, channel: str) -> bool:
        return ALL_CHANNELS in self.channels or channel in self.channels

    def check_scope(self, channels: Iterable[str]) -> None:
        """Raise TokenRefused(OUT_OF_SCOPE) naming the first channel the token does not cover."""
        for channel in channels:
            if not self.allows(channel):
                raise TokenRefused(OUT_OF_SCOPE, f"channel {channel[:64]!r} is outside the token's scope")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest())


def issue(secret: bytes, viewer: str, channels: Iterable[str], expires: int) -> str:
    """A token for `viewer`, valid for `channels` (or ["*"]) until unix time `expires`."""
    if not secret:
        raise ValueError("an empty secret signs nothing")
    payload = orjson.dumps({"sub": viewer, "channels": list(channels), "exp": int(expires)})
    body = _b64(payload)
    return f"{body}.{_signature(secret, body)}"


def verify(secret: bytes, token: str | None, now: float) -> Claims:
    """The claims of a well-signed, unexpired token; TokenRefused otherwise."""
    if not token:
        raise TokenRefused(MISSING, "no token")
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise TokenRefused(MALFORMED, "a token is two base64url parts joined by a dot")
    body, signature = token.split(".")
    try:
        given = signature.encode("ascii")
    except UnicodeEncodeError:
        raise TokenRefused(MALFORMED, "a token is ASCII") from None
    if not hmac.compare_digest(_signature(secret, body).encode("ascii"), given):
        raise TokenRefused(BAD_SIGNATURE, "bad signature")
    # Only a payload we signed ourselves gets parsed.
    try:
        payload = orjson.loads(_unb64(body))
    except (binascii.Error, ValueError):
        raise TokenRefused(MALFORMED, "the payload is not base64url JSON") from None
    if not isinstance(payload, dict):
        raise TokenRefused(MALFORMED, "the payload is not a JSON object")
    viewer, channels, expires = payload.get("sub"), payload.get("channels"), payload.get("exp")
    if (
        not isinstance(viewer, str)
        or not isinstance(channels, list)
        or not all(isinstance(c, str) for c in channels)
        or type(expires) is not int
    ):
        raise TokenRefused(MALFORMED, "the payload needs sub (string), channels (strings) and exp (integer)")
    if now >= expires:
        raise TokenRefused(EXPIRED, "the token has expired")
    return Claims(viewer, frozenset(channels), expires)
