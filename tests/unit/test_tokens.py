"""Viewer tokens: the format the pages and any token-minting backend rely on, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core import tokens

SECRET = b"test-secret"
NOW = 1_700_000_000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _reason(token: str | None, now: float = NOW, secret: bytes = SECRET) -> str:
    with pytest.raises(tokens.TokenRefused) as info:
        tokens.verify(secret, token, now)
    return info.value.reason


def test_format_is_b64url_payload_dot_hmac_of_that_text() -> None:
    token = tokens.issue(SECRET, "v1", ["video-1"], NOW + 60)
    body, signature = token.split(".")
    assert orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == {
        "sub": "v1",
        "channels": ["video-1"],
        "exp": NOW + 60,
    }
    assert signature == _b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
    assert "=" not in token


def test_a_token_minted_elsewhere_with_the_same_recipe_is_accepted() -> None:
    body = _b64(b'{"sub":"viewer-9","channels":["*"],"exp":1700000100}')
    token = body + "." + _b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
    claims = tokens.verify(SECRET, token, NOW)
    assert claims.viewer == "viewer-9"
    assert claims.allows("anything") and claims.allows("video-2")


def test_scope() -> None:
    claims = tokens.verify(SECRET, tokens.issue(SECRET, "v", ["a", "b"], NOW + 1), NOW)
    assert claims.allows("a") and claims.allows("b") and not claims.allows("c")
    claims.check_scope(["a", "b"])
    with pytest.raises(tokens.TokenRefused) as info:
        claims.check_scope(["a", "c"])
    assert info.value.reason == tokens.OUT_OF_SCOPE


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token: str | None) -> None:
    assert _reason(token) == tokens.MISSING


def test_bad_signature_other_secret() -> None:
    assert _reason(tokens.issue(b"another secret", "v", ["a"], NOW + 60)) == tokens.BAD_SIGNATURE


def test_bad_signature_payload_swapped() -> None:
    """A viewer cannot widen its own scope: the payload is what is signed."""
    token = tokens.issue(SECRET, "v", ["a"], NOW + 60)
    wider = _b64(orjson.dumps({"sub": "v", "channels": ["*"], "exp": NOW + 60}))
    assert _reason(wider + "." + token.split(".")[1]) == tokens.BAD_SIGNATURE


def test_expired() -> None:
    token = tokens.issue(SECRET, "v", ["a"], NOW + 60)
    assert tokens.verify(SECRET, token, NOW + 59.9).viewer == "v"
    assert _reason(token, now=NOW + 60) == tokens.EXPIRED
    assert _reason(token, now=NOW + 3600) == tokens.EXPIRED


@pytest.mark.parametrize("token", ["abc", "a.b.c", "é.é", "x" * 9000 + ".y"])
def test_malformed(token: str) -> None:
    assert _reason(token) == tokens.MALFORMED


def test_signed_but_not_a_payload() -> None:
    """Only a correctly signed payload is parsed; a signed non-object is still refused."""
    for raw in (
        b"[1,2]",
        b"not json",
        b'{"sub":"v","channels":"a","exp":1}',
        b'{"sub":"v","channels":[],"exp":"1"}',
    ):
        body = _b64(raw)
        token = body + "." + _b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
        assert _reason(token) == tokens.MALFORMED


@given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
def test_any_change_to_a_token_is_refused(position: int, char: str) -> None:
    token = tokens.issue(SECRET, "viewer-1", ["video-1", "video-2"], NOW + 60)
    i = position % len(token)
    changed = token[:i] + char + token[i + 1 :]
    if changed == token:
        return
    assert _reason(changed) in (tokens.BAD_SIGNATURE, tokens.MALFORMED)


def test_empty_secret_signs_nothing() -> None:
    with pytest.raises(ValueError):
        tokens.issue(b"", "v", ["a"], NOW)
