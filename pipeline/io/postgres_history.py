"""The readers' history: buckets Redis no longer holds, read from the sink's PostgreSQL rollups.

Redis stays the hot store; its time buckets expire after their rollup's retention. The sink tier
(pipeline/tiers/sink.py) writes every bucket to PostgreSQL exactly once and keeps it per its own
retention (hours for good by default). The reader API (`pipeline.read.Reader(history=...)`) asks
here for the buckets of a series that Redis does not have, one indexed range query per series
(the rollups' primary key is (metric, size_s, channel, key, bucket)).

A history that cannot be reached answers nothing (and says so in the log once per outage): the
series then shows what Redis has, as it did without a history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from pipeline.core.topology import Topology
from pipeline.io.postgres_sink import CONNECTION_ERRORS, redact, schema_name


def _number(value: Any) -> float:
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


class PostgresHistory:
    """Reads one topology's rollups from PostgreSQL through a small pool opened at first use."""

    def __init__(self, topology: Topology, url: str, *, max_size: int = 4) -> None:
        self.topology = topology
        self.url = url
        self.schema = schema_name(topology)
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._down = False
        self.log = structlog.get_logger().bind(topology=topology.name, postgres=redact(url))

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.url, min_size=0, max_size=self.max_size, timeout=5, command_timeout=10
                )
            rows: list[asyncpg.Record] = await self._pool.fetch(query, *args)
        except asyncpg.UndefinedTableError:
            return []  # no sink has written this topology yet
        except CONNECTION_ERRORS as exc:
            if not self._down:
                self.log.warning("history unreachable; series show what Redis holds", error=repr(exc))
                self._down = True
            return []
        if self._down:
            self.log.warning("history reachable again")
            self._down = False
        return rows

    async def key_buckets(
        self, metric: str, channel: str, key: str, size_s: int, starts: Sequence[int]
    ) -> dict[int, float]:
        """bucket start -> value of one key, for those of `starts` PostgreSQL holds."""
        if not starts:
            return {}
        rows = await self._fetch(
            f"SELECT bucket, value FROM {self.schema}.rollups WHERE metric = $1 AND size_s = $2 "
            "AND channel = $3 AND key = $4 AND bucket = ANY($5::bigint[])",
            metric,
            size_s,
            channel,
            key,
            list(starts),
        )
        return {int(r["bucket"]): _number(r["value"]) for r in rows}

    async def channel_buckets(
        self, metric: str, channel: str, size_s: int, starts: Sequence[int]
    ) -> dict[int, float]:
        """bucket start -> the sum over the channel's keys (count and sum metrics)."""
        if not starts:
            return {}
        rows = await self._fetch(
            f"SELECT bucket, sum(value) AS value FROM {self.schema}.rollups WHERE metric = $1 "
            "AND size_s = $2 AND bucket = ANY($3::bigint[]) AND channel = $4 GROUP BY bucket",
            metric,
            size_s,
            list(starts),
            channel,
        )
        return {int(r["bucket"]): _number(r["value"]) for r in rows}

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
