"""Connecting to Redis as the settings say: URL, ACL user and password, TLS; secrets kept out of logs."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

from pipeline.runtime.settings import Settings


def options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url(settings.redis, ...)`: only what the settings set."""
    kwargs: dict[str, Any] = {}
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    password = settings.redis_password.get_secret_value()
    if password:
        kwargs["password"] = password
    if settings.redis_ssl_cafile:
        kwargs["ssl_ca_certs"] = settings.redis_ssl_cafile
    return kwargs


def connect(settings: Settings, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for the configured server (credentials in the URL win over settings)."""
    return aioredis.Redis.from_url(settings.redis, **(kwargs | options(settings)))


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for log lines and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
