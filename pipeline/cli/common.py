"""What several commands share: the local-server flags, and handlers that load their module on use."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import TypeAlias

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what register() takes
Handler: TypeAlias = Callable[[argparse.Namespace], int]


def lazy(module: str, function: str = "main") -> Handler:
    """A handler that imports `module` only when its command runs, then calls `function(args)`.

    So `pipeline --help` and `pipeline run` load neither the harness nor the benchmarks (nor the
    extras those need).
    """

    def handler(args: argparse.Namespace) -> int:
        result: int = getattr(importlib.import_module(module), function)(args)
        return result

    handler.__qualname__ = f"lazy({module}.{function})"
    return handler


def broker_flag(p: argparse.ArgumentParser, *extra: str) -> None:
    p.add_argument(
        "--broker",
        choices=["auto", "kafka", "embedded", *extra],
        help="which local broker to start: Apache Kafka (KRaft; needs a JDK 17+ and the jars that "
        "ops/kafka/fetch brings) or the embedded Kafka-protocol broker; auto (the default, or "
        "$PIPELINE_LOCAL_BROKER) picks Apache Kafka where it can run",
    )


def server_flags(p: argparse.ArgumentParser, *extra_brokers: str) -> None:
    p.add_argument("--kafka", help="Kafka bootstrap servers (default: start a local broker)")
    p.add_argument("--redis", help="Redis URL (default: start a local Redis)")
    broker_flag(p, *extra_brokers)
