"""One local server process: started in its own session, probed until usable, stopped or killed.

The base of the local servers (pipeline.harness.local_servers, pipeline.harness.local_kafka): a
log file per server, restart on the same port and data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

__all__ = ["STOP_TIMEOUT_S", "ServerProcess", "free_port", "port_open", "probe_metadata", "run_blocking"]

STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run_blocking(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
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


class ServerProcess:
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
    def _prepare(self) -> None:
        """Write whatever the server needs on disk before it starts (config, formatted storage)."""

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
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting (servers that need each other start together)."""
        if self.running:
            return
        self._prepare()
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

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until clients can use the launched server; kill it if it does not get there."""
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
            if port_open(self.port):
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


def probe_metadata(bootstrap: str) -> None:
    """Raise unless a Kafka metadata round trip works: an open port is not enough for a broker."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def metadata() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        await admin.start()
        try:
            await admin.list_topics()
        finally:
            await admin.close()

    run_blocking(metadata)
