"""Apache Kafka itself (KRaft mode) on loopback: one node for the suite, three for chaos.

The broker's jars come from Maven Central through `ops/kafka/pom.xml` (`ops/kafka/fetch`
puts them in `.kafka/lib`, or wherever PIPELINE_KAFKA_LIBS points). Each node is a
combined broker + controller JVM with its own ports and directory; a cluster of three
votes with a static quorum, keeps every topic at replication factor 3 with
`min.insync.replicas=2`, and survives the SIGKILL of any one node.

An optional SASL_SSL listener (SCRAM-SHA-512 over TLS, a self-signed certificate for
127.0.0.1 made with the JDK's keytool) serves the security tests; the PLAINTEXT listener
stays for the harness itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.harness.server_process import ServerProcess, free_port, probe_metadata

__all__ = [
    "KafkaCluster",
    "KafkaNode",
    "KafkaSecurity",
    "apache_kafka_available",
    "kafka_libs",
]

LIBS_ENV = "PIPELINE_KAFKA_LIBS"
JVM_OPTS_ENV = "PIPELINE_KAFKA_JVM_OPTS"
# Local brokers live minutes, on 2 cores beside the pipeline: the C2 compiler's warm-up was most of their
# CPU in a chaos run (3 brokers ~160% of 200% at 3,500 events/s; with C1 only and the serial collector
# ~110% at 7,700 events/s). Production brokers keep the JVM's defaults.
DEFAULT_JVM_OPTS = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1"
MIN_JAVA = 17
SCRAM_MECHANISM = "SCRAM-SHA-512"

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def kafka_libs() -> Path | None:
    """The folder holding the broker's jars, or None if they were not fetched."""
    env = os.environ.get(LIBS_ENV)
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / ".kafka" / "lib"  # the checkout's
    return folder if any(folder.glob("kafka_2.13-*.jar")) else None


def java_version(java: str = "java") -> int | None:
    """The major version of the `java` on PATH (None if there is none)."""
    if shutil.which(java) is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def apache_kafka_available() -> str | None:
    """None if Apache Kafka can run here, else the reason it cannot."""
    version = java_version()
    if version is None:
        return "no java on PATH"
    if version < MIN_JAVA:
        return f"java {version} is older than {MIN_JAVA} (Kafka 4 brokers need {MIN_JAVA}+)"
    if kafka_libs() is None:
        return f"the Kafka jars were not fetched (run ops/kafka/fetch, or set {LIBS_ENV})"
    return None


@dataclass(frozen=True)
class KafkaSecurity:
    """What a SASL_SSL listener needs: one SCRAM user and a keystore with a cert for 127.0.0.1."""

    username: str
    password: str
    keystore: Path
    keystore_password: str
    ca_pem: Path  # the certificate clients trust (self-signed: the server's own)

    @classmethod
    def create(cls, folder: Path, username: str = "pipeline", password: str | None = None) -> KafkaSecurity:
        """A self-signed certificate for 127.0.0.1/localhost (JDK keytool) and a random password."""
        folder.mkdir(parents=True, exist_ok=True)
        store_password = uuid.uuid4().hex
        keystore = folder / "broker.p12"
        ca_pem = folder / "ca.pem"
        if not keystore.exists():
            keytool = ["keytool", "-noprompt", "-storetype", "PKCS12", "-keystore", str(keystore)]
            subprocess.run(
                [
                    *keytool,
                    "-genkeypair",
                    "-alias",
                    "broker",
                    "-keyalg",
                    "RSA",
                    "-keysize",
                    "2048",
                    "-validity",
                    "30",
                    "-dname",
                    "CN=localhost",
                    "-ext",
                    "SAN=ip:127.0.0.1,dns:localhost",
                    "-storepass",
                    store_password,
                    "-keypass",
                    store_password,
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    *keytool,
                    "-exportcert",
                    "-rfc",
                    "-alias",
                    "broker",
                    "-storepass",
                    store_password,
                    "-file",
                    str(ca_pem),
                ],
                check=True,
                capture_output=True,
            )
            (folder / "storepass").write_text(store_password)
        store_password = (folder / "storepass").read_text()
        return cls(username, password or uuid.uuid4().hex, keystore, store_password, ca_pem)


class KafkaNode(ServerProcess):
    """One Apache Kafka node (broker + KRaft controller) on 127.0.0.1."""

    name = "kafka"
    kind = "apache-kafka"

    def __init__(
        self,
        data_dir: Path | str,
        *,
        node_id: int = 1,
        cluster_id: str,
        port: int | None = None,
        controller_port: int | None = None,
        voters: str | None = None,
        replication: int = 1,
        security: KafkaSecurity | None = None,
        heap_mb: int = 512,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.controller_port = controller_port if controller_port is not None else free_port()
        self.voters = voters or f"{node_id}@127.0.0.1:{self.controller_port}"
        self.replication = replication
        self.security = security
        self.sasl_port = free_port() if security is not None else None
        self.heap_mb = heap_mb
        self.extra_config = extra_config or {}
        self.libs = kafka_libs()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str | None:
        return f"127.0.0.1:{self.sasl_port}" if self.sasl_port is not None else None

    def config(self) -> dict[str, str]:
        r = str(self.replication)
        isr = str(min(2, self.replication))
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        conf = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "default.replication.factor": r,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": r,
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": r,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": r,
            "share.coordinator.state.topic.min.isr": isr,
            # no 3 s wait for more members on every new group
            "group.initial.rebalance.delay.ms": "0",
            "unclean.leader.election.enable": "false",
            # a SIGKILLed broker is fenced, and its partitions led elsewhere, after 3 s (default 9 s)
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "auto.create.topics.enable": "true",
        }
        if self.replication > 1:
            # followers fetch up to 20 ms' worth at a time instead of one fetch per produced batch:
            # on 2 cores, per-batch replication fetches were most of the brokers' CPU
            conf |= {"replica.fetch.min.bytes": "65536", "replica.fetch.wait.max.ms": "20"}
        if self.security is not None:
            listeners.append(f"SASL_SSL://127.0.0.1:{self.sasl_port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL_SSL:SASL_SSL")
            conf |= {
                "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "ssl.keystore.type": "PKCS12",
                "ssl.keystore.location": str(self.security.keystore),
                "ssl.keystore.password": self.security.keystore_password,
                "ssl.key.password": self.security.keystore_password,
            }
        conf |= {
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "listener.security.protocol.map": ",".join(protocols),
        }
        return conf | self.extra_config

    def _java(self, main: str, *args: str, heap_mb: int) -> list[str]:
        if self.libs is None:
            raise RuntimeError(f"Apache Kafka cannot run here: {apache_kafka_available()}")
        return [
            "java",
            f"-Xms{min(heap_mb, 256)}m",
            f"-Xmx{heap_mb}m",
            *os.environ.get(JVM_OPTS_ENV, DEFAULT_JVM_OPTS).split(),
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _prepare(self) -> None:
        props = self.data_dir / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in self.config().items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2)
        if (self.data_dir / "logs" / "meta.properties").exists():
            return
        scram: list[str] = []
        if self.security is not None:
            scram = [
                "--add-scram",
                f"{SCRAM_MECHANISM}=[name={self.security.username},password={self.security.password}]",
            ]
        fmt = self._java(
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            f"--cluster-id={self.cluster_id}",  # one token: an id may start with "-"
            "-c",
            str(props),
            *scram,
            heap_mb=256,
        )
        done = subprocess.run(fmt, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"kafka storage format failed ({done.returncode}): {done.stdout}{done.stderr}")

    def _command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.data_dir / "server.properties"), heap_mb=self.heap_mb)

    def _probe(self) -> None:
        probe_metadata(self.bootstrap)

    def _startup_failure(self, log_since_start: str) -> bool:
        return "Exiting Kafka" in log_since_start or "Exiting because" in log_since_start


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (what `random-uuid` prints)."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class KafkaCluster:
    """`size` combined nodes voting in one static quorum; replication factor min(3, size).

    Quacks like one broker for the harness (`bootstrap`, `start`, `stop`, `kill`,
    `running`): those act on every node. Chaos reaches single nodes through `nodes`.
    """

    kind = "apache-kafka"

    def __init__(
        self,
        root: Path | str,
        size: int = 1,
        *,
        ports: Sequence[int] | None = None,
    ) -> None:
        root = Path(root)
        self.root = root
        self.size = size
        cluster_id_file = root / "cluster-id"
        root.mkdir(parents=True, exist_ok=True)
        if not cluster_id_file.exists():
            cluster_id_file.write_text(new_cluster_id())
        cluster_id = cluster_id_file.read_text().strip()
        controller_ports = [free_port() for _ in range(size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(controller_ports))
        replication = min(3, size)
        self.nodes = [
            KafkaNode(
                root / (f"node{i + 1}" if size > 1 else "node"),
                node_id=i + 1,
                cluster_id=cluster_id,
                port=ports[i] if ports else None,
                controller_port=controller_ports[i],
                voters=voters,
                replication=replication,
                heap_mb=512 if size == 1 else 384,
            )
            for i in range(size)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def data_dir(self) -> Path:
        return self.root

    @property
    def running(self) -> bool:
        return all(n.running for n in self.nodes)

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid

    def start(self, timeout: float = 90.0) -> None:
        """Start every node that is down (they need each other for a quorum), then wait for all."""
        down = [n for n in self.nodes if not n.running]
        try:
            for node in down:
                node.launch()
            for node in down:
                node.wait_ready(timeout)
        except BaseException:
            for node in down:
                node.kill()
            raise

    def stop(self) -> None:
        """SIGTERM every node at once: one by one, the last would wait for a quorum that is gone."""
        stoppers = [threading.Thread(target=n.stop, name=f"stop-{n.node_id}") for n in self.nodes]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def __repr__(self) -> str:
        return f"<KafkaCluster {self.bootstrap} nodes={self.size} dir={self.root}>"
