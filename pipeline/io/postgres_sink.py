"""Every line of the sink tier that talks to PostgreSQL (asyncpg): the schema and its migrations, the
batch apply (rows and offsets in one transaction), the applied positions, retention.

Each topology has its own schema, named after it (topology names are lower-case identifiers), with:

- `rollups`: one row per (metric, size_s, bucket, channel, key); `size_s` 0 and `bucket` 0 for the
  all-time total, else the bucket's size and start (epoch seconds); `kind` 0 count, 1 sum, 2 min,
  3 max, 4 distinct; `value` numeric (exact; for distinct the estimate of `registers`, HyperLogLog
  registers merged with the row's under its lock). The primary key (metric, size_s, channel, key,
  bucket) serves "the hourly views of /home over 30 days" as one index range; `rollups_by_bucket`
  (size_s, bucket, metric) serves a whole bucket and the retention deletes;
- `positions`: the last applied offset of every partials partition, written in the same transaction
  as the rows;
- `retention`: seconds each bucket size is kept (0: for good), as the sink applies it;
- `migrations`: the schema versions applied (`MIGRATIONS`, applied in order under an advisory lock).

A batch: lock and read the positions of its partitions (an upsert that leaves them as they are),
refuse it if one range replays or does not follow (core/sink_plan.check_ranges), COPY its rows into
a temporary table, one INSERT ... SELECT ... ON CONFLICT DO UPDATE, store the new positions, commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from pipeline.core.aggregates import Kind
from pipeline.core.merger import MergedBatch
from pipeline.core.sink_plan import (
    KIND_CODES,
    RangeRefusal,
    Row,
    RowKey,
    RowPlan,
    check_ranges,
    merge_distinct,
    new_positions,
    row_key,
)
from pipeline.core.topology import Topology

SCHEMA_VERSION = 3

# (version, statements); {s} is the topology's schema. Never edit an applied one: add a version.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS {s}.rollups (
                metric text NOT NULL,
                size_s integer NOT NULL,
                bucket bigint NOT NULL,
                channel text NOT NULL,
                key text NOT NULL,
                kind smallint NOT NULL,
                value numeric NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (metric, size_s, channel, key, bucket)
            )""",
            """CREATE TABLE IF NOT EXISTS {s}.positions (
                partition integer PRIMARY KEY,
                last_offset bigint NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now()
            )""",
        ),
    ),
    (
        2,
        (
            "CREATE INDEX IF NOT EXISTS rollups_by_bucket ON {s}.rollups (size_s, bucket, metric)",
            """CREATE TABLE IF NOT EXISTS {s}.retention (
                size_s integer PRIMARY KEY,
                keep_s bigint NOT NULL
            )""",
        ),
    ),
    # distinct metrics: HyperLogLog registers (core/hll.py) beside their estimate in `value`
    (3, ("ALTER TABLE {s}.rollups ADD COLUMN IF NOT EXISTS registers bytea",)),
)

COLUMNS = ("metric", "size_s", "bucket", "channel", "key", "kind", "value", "registers")
STAGE = "pipeline_sink_rows"  # the temporary table rows are copied into (one per connection)
MIN, MAX, DISTINCT = KIND_CODES[Kind.MIN], KIND_CODES[Kind.MAX], KIND_CODES[Kind.DISTINCT]

# what a lost or refused connection raises: the sink reconnects and seeks to the applied positions
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    TimeoutError,
)


def schema_name(topology: Topology) -> str:
    return topology.name  # matches ^[a-z][a-z0-9_]{0,62}$: a plain identifier


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    creds, _, host = tail.rpartition("@")
    user = creds.partition(":")[0]
    return f"{head}://{user}:***@{host}" if ":" in creds else f"{head}://{user}@{host}"


async def connect(url: str, timeout_s: float = 10.0) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=timeout_s, command_timeout=60)


async def migrate(conn: asyncpg.Connection, topology: Topology) -> int:
    """Create or upgrade the topology's schema to SCHEMA_VERSION; returns the version it was at."""
    s = schema_name(topology)
    async with conn.transaction():
        # one migrator at a time per schema (sinks starting together)
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pipeline-sink:{s}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.migrations ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        was = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {s}.migrations")
        for version, statements in MIGRATIONS:
            if version <= was:
                continue
            for statement in statements:
                await conn.execute(statement.format(s=s))
            await conn.execute(f"INSERT INTO {s}.migrations (version) VALUES ($1)", version)
    return int(was)


@dataclass(frozen=True, slots=True)
class SinkResult:
    applied: bool
    refusal: RangeRefusal | None = None
    rows: int = 0
    statements: int = 0


class _Refused(Exception):
    def __init__(self, refusal: RangeRefusal) -> None:
        super().__init__(refusal)
        self.refusal = refusal


class PostgresSink:
    """Applies merged batches to one topology's schema over one connection.

    `naive=True` writes each row as its own INSERT ... ON CONFLICT statement (in the same transaction,
    with the same offsets): the baseline `pipeline bench sink` measures the batched apply against.
    """

    def __init__(self, conn: asyncpg.Connection, topology: Topology, *, naive: bool = False) -> None:
        self.conn = conn
        self.topology = topology
        self.naive = naive
        s = schema_name(topology)
        self.schema = s
        self._staged = False
        set_value = (
            f"value = CASE r.kind WHEN {MIN} THEN least(r.value, EXCLUDED.value) "
            f"WHEN {MAX} THEN greatest(r.value, EXCLUDED.value) "
            f"WHEN {DISTINCT} THEN EXCLUDED.value ELSE r.value + EXCLUDED.value END, "
            # distinct: the registers were merged with the row's (read under its lock) before the COPY
            f"registers = CASE WHEN r.kind = {DISTINCT} THEN EXCLUDED.registers ELSE r.registers END, "
            "updated_at = now()"
        )
        conflict = f"ON CONFLICT (metric, size_s, channel, key, bucket) DO UPDATE SET {set_value}"
        self._upsert = (
            f"INSERT INTO {s}.rollups AS r ({', '.join(COLUMNS)}) "
            f"SELECT {', '.join(COLUMNS)} FROM {STAGE} ORDER BY metric, size_s, channel, key, bucket "
            + conflict
        )
        self._upsert_one = (
            f"INSERT INTO {s}.rollups AS r ({', '.join(COLUMNS)}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
            + conflict
        )
        # lock the batch's positions and read them: an upsert that leaves a held position as it is
        self._lock_positions = (
            f"INSERT INTO {s}.positions AS p (partition, last_offset) "
            "SELECT unnest($1::integer[]), -1 "
            "ON CONFLICT (partition) DO UPDATE SET last_offset = p.last_offset "
            "RETURNING partition, last_offset"
        )
        # the registers the distinct rows of a batch hold, locked until the commit
        self._held_registers = (
            f"SELECT r.metric, r.size_s, r.channel, r.key, r.bucket, r.registers FROM {s}.rollups AS r "
            "JOIN unnest($1::text[], $2::integer[], $3::text[], $4::text[], $5::bigint[]) "
            "AS w(metric, size_s, channel, key, bucket) USING (metric, size_s, channel, key, bucket) "
            "FOR UPDATE OF r"
        )
        self._store_positions = (
            f"UPDATE {s}.positions AS p SET last_offset = v.last, updated_at = now() "
            "FROM unnest($1::integer[], $2::bigint[]) AS v(partition, last) WHERE p.partition = v.partition"
        )

    async def prepare(self) -> None:
        """The temporary staging table of this connection (emptied at every commit)."""
        await self.conn.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE} ("
            "metric text, size_s integer, bucket bigint, channel text, key text, kind smallint, "
            "value numeric, registers bytea) ON COMMIT DELETE ROWS"
        )
        self._staged = True

    async def positions(self) -> dict[int, int]:
        rows = await self.conn.fetch(f"SELECT partition, last_offset FROM {self.schema}.positions")
        return {int(r["partition"]): int(r["last_offset"]) for r in rows if r["last_offset"] >= 0}

    async def apply(self, batch: MergedBatch, plan: RowPlan) -> SinkResult:
        """The batch's rows and positions in one transaction, or nothing of it (a refused range)."""
        if not self._staged and not self.naive:
            await self.prepare()
        conn = self.conn
        rows = plan.rows
        partitions = sorted(batch.ranges)
        statements = 0
        try:
            async with conn.transaction():
                held = {
                    int(r["partition"]): int(r["last_offset"])
                    for r in await conn.fetch(self._lock_positions, partitions)
                }
                statements += 1
                refusal = check_ranges(batch.ranges, held, batch.expected)
                if refusal is not None:
                    raise _Refused(refusal)
                if plan.distinct_cells:
                    rows = merge_distinct(rows, await self._registers_held(rows))
                    statements += 1
                if rows:
                    if self.naive:
                        for row in rows:
                            await conn.execute(self._upsert_one, *row)
                        statements += len(rows)
                    else:
                        await conn.copy_records_to_table(STAGE, records=rows, columns=COLUMNS)
                        await conn.execute(self._upsert)
                        statements += 2
                last = new_positions(batch.ranges)
                await conn.execute(self._store_positions, [p for p, _ in last], [o for _, o in last])
                statements += 1
        except _Refused as refused:
            return SinkResult(False, refused.refusal, statements=statements)
        return SinkResult(True, None, rows=len(rows), statements=statements)

    async def _registers_held(self, rows: list[Row]) -> dict[RowKey, bytes | None]:
        keys = [row_key(row) for row in rows if row[5] == DISTINCT]
        if not keys:
            return {}
        found = await self.conn.fetch(
            self._held_registers, *(list(column) for column in zip(*keys, strict=True))
        )
        return {
            (r["metric"], int(r["size_s"]), r["channel"], r["key"], int(r["bucket"])): r["registers"]
            for r in found
        }

    async def record_retention(self, policy: Mapping[int, int]) -> None:
        async with self.conn.transaction():
            await self.conn.execute(f"DELETE FROM {self.schema}.retention")
            await self.conn.executemany(
                f"INSERT INTO {self.schema}.retention (size_s, keep_s) VALUES ($1, $2)", list(policy.items())
            )

    async def delete_expired(self, cutoffs: Mapping[int, int]) -> int:
        """Drop the buckets retention no longer keeps; returns the rows deleted."""
        deleted = 0
        for size_s, first_kept in sorted(cutoffs.items()):
            status = await self.conn.execute(
                f"DELETE FROM {self.schema}.rollups WHERE size_s = $1 AND bucket < $2", size_s, first_kept
            )
            deleted += int(status.rsplit(" ", 1)[-1])
        return deleted


# --- reads (the reader API's history, the harness's checks) ------------------------------------


async def bucket_values(
    conn: asyncpg.Connection,
    topology: Topology,
    metric: str,
    channel: str,
    key: str,
    size_s: int,
    starts: Sequence[int],
) -> dict[int, float]:
    """bucket start -> value held in PostgreSQL, for the given starts (absent: no row)."""
    if not starts:
        return {}
    rows = await conn.fetch(
        f"SELECT bucket, value FROM {schema_name(topology)}.rollups "
        "WHERE metric = $1 AND size_s = $2 AND channel = $3 AND key = $4 AND bucket BETWEEN $5 AND $6",
        metric,
        size_s,
        channel,
        key,
        min(starts),
        max(starts),
    )
    wanted = set(starts)
    return {int(r["bucket"]): _number(r["value"]) for r in rows if int(r["bucket"]) in wanted}


async def all_rows(
    conn: asyncpg.Connection, topology: Topology, metric: str
) -> dict[tuple[int, int, str, str], Any]:
    """(size_s, bucket, channel, key) -> value of every row of a metric (tests, chaos checks)."""
    try:
        rows = await conn.fetch(
            f"SELECT size_s, bucket, channel, key, value FROM {schema_name(topology)}.rollups "
            "WHERE metric = $1",
            metric,
        )
    except asyncpg.UndefinedTableError:
        return {}
    return {(int(r["size_s"]), int(r["bucket"]), r["channel"], r["key"]): r["value"] for r in rows}


async def held_positions(conn: asyncpg.Connection, topology: Topology) -> dict[int, int]:
    try:
        rows = await conn.fetch(f"SELECT partition, last_offset FROM {schema_name(topology)}.positions")
    except asyncpg.UndefinedTableError:
        return {}
    return {int(r["partition"]): int(r["last_offset"]) for r in rows}


def _number(value: Any) -> float:
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


async def metric_total(conn: asyncpg.Connection, topology: Topology, metric: str) -> float:
    """The all-time total of a metric over every channel and key (0 before the sink wrote any)."""
    try:
        value = await conn.fetchval(
            f"SELECT coalesce(sum(value), 0) FROM {schema_name(topology)}.rollups "
            "WHERE metric = $1 AND size_s = 0",
            metric,
        )
    except asyncpg.UndefinedTableError:
        return 0
    return _number(value)
