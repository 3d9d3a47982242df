"""A real PostgreSQL on 127.0.0.1 for the tests, the demo, chaos and the sink benchmark.

The server is Debian's (`apt-get install postgresql`, which ops/_setup.sh does when it is missing):
`initdb` once into a data directory, then `postgres` itself as the process (no `pg_ctl`, so the
harness holds the postmaster's pid, stops it and kills it like any other local server). PostgreSQL
refuses to run as root: under root the server runs as the `postgres` user (through `setpriv`, which
execs, so the pid stays the server's) with its data directory owned by that user, outside the
harness's root-only temporary directories.

Settings fit a throwaway server: trust authentication on 127.0.0.1 only, no Unix socket, `fsync` off
(a killed server keeps what it wrote: the OS holds the pages; only a machine crash would lose them),
`synchronous_commit` on, so a commit the sink saw is in the WAL before it is answered.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.harness.server_process import ServerProcess, run_blocking

__all__ = ["LocalPostgres", "PostgresEndpoint", "PostgresServer", "postgres_bin_dir"]

BIN_ENV = "PIPELINE_POSTGRES_BIN"
SERVICE_USER = "postgres"


def postgres_bin_dir() -> Path:
    """Where `initdb` and `postgres` are: $PIPELINE_POSTGRES_BIN, Debian's newest, or PATH's."""
    env = os.environ.get(BIN_ENV)
    if env:
        return Path(env)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError(
        "no PostgreSQL server found: install Debian's (apt-get install postgresql; ops/_setup.sh does) "
        f"or set {BIN_ENV} to the folder holding initdb and postgres"
    )


class PostgresServer(ServerProcess):
    """One PostgreSQL server, restartable on the same port and data; `url` connects as `postgres`."""

    name = "postgres"

    def __init__(self, data_dir: Path | str, port: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.bin = postgres_bin_dir()
        self._as_root = os.geteuid() == 0
        self._own_pgdata: Path | None = None
        if self._as_root:
            # the harness's temp dirs are root-only (0700): the server's data lives in one of its own
            self._own_pgdata = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))
            user = pwd.getpwnam(SERVICE_USER)
            os.chown(self._own_pgdata, user.pw_uid, user.pw_gid)
            self.pgdata = self._own_pgdata / "data"
        else:
            self.pgdata = self.data_dir / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_service_user(self, command: list[str]) -> list[str]:
        if not self._as_root:
            return command
        return [
            "setpriv",
            f"--reuid={SERVICE_USER}",
            f"--regid={SERVICE_USER}",
            "--init-groups",
            "--",
            *command,
        ]

    def _prepare(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        done = subprocess.run(
            self._as_service_user(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")

    def _command(self) -> list[str]:
        return self._as_service_user(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=on",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=64MB",
                "-c",
                "log_min_messages=warning",
            ]
        )

    def _probe(self) -> None:
        async def probe() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url, timeout=2)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        run_blocking(probe)

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected; SIGTERM would wait for them to leave)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGQUIT)
        super().stop(timeout)

    def kill(self) -> None:
        """A crash: immediate shutdown (SIGQUIT: no checkpoint, recovery from the WAL at the next start).
        A SIGKILL of the postmaster would leave its backends holding the shared memory, and no new
        server could start on this data until they died."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def remove(self) -> None:
        """Stop the server and delete its data."""
        self.stop()
        if self._own_pgdata is not None:
            shutil.rmtree(self._own_pgdata, ignore_errors=True)
        else:
            shutil.rmtree(self.pgdata, ignore_errors=True)


class LocalPostgres:
    """A context manager around one PostgresServer in `root` (removed on exit)."""

    def __init__(self, root: Path | str | None = None, port: int | None = None) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="pipeline-pg-logs-")) if root is None else Path(root)
        self.server = PostgresServer(self.root, port)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> PostgresServer:
        try:
            self.server.start(timeout=60)
        except BaseException:
            self.server.remove()
            raise
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.remove()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class PostgresEndpoint:
    """Where PostgreSQL is; `server` only when this process started it (restartable)."""

    url: str
    server: PostgresServer | None = None
