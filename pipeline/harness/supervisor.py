"""Workers as separate processes, for the demo, the tests and the chaos harness.

A worker keeps its identity (`--instance`) across restarts: on Kafka that is
its static membership and transactional id, so a restarted worker takes its
partitions back at once and fences the one it replaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class WorkerProcess:
    def __init__(
        self,
        topology: str,
        tier: str,
        instance: str,
        kafka: str,
        redis: str,
        log_dir: Path,
        log_level: str = "info",
        extra_env: dict[str, str] | None = None,
        name: str | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.topology = topology
        self.tier = tier
        self.instance = instance
        self.kafka = kafka
        self.redis = redis
        self.log_path = Path(log_dir) / f"{name or topology}-{tier}-{instance}.log"
        self.log_level = log_level
        self.extra_env = extra_env or {}
        self.rename = name
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return f"{self.tier}/{self.instance}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            self.topology,
            "--tier",
            self.tier,
            "--instance",
            self.instance,
            "--kafka",
            self.kafka,
            "--redis",
            self.redis,
            "--log-level",
            self.log_level,
            "--metrics-port",
            str(self.metrics_port),
        ] + (["--name", self.rename] if self.rename else [])

    def start(self) -> WorkerProcess:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, **self.extra_env}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.starts += 1
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye; what a crash looks like."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM: finish the window, commit, leave. SIGKILL if it takes longer than `timeout`."""
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def rss_kb(pid: int | None) -> int | None:
    """Resident set size of a process in KiB, None if it is gone (or not ours to see)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
