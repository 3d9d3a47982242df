"""`from pipeline import ...` gives a user everything they write against: topologies and the SDK."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pipeline
import pipeline.client
import pipeline.io.kafka
import pipeline.read
import pipeline.sync_client

# `pipeline.topology` is the function; the module it comes from is pipeline/topology.py
TOPOLOGY_MODULE = importlib.import_module("pipeline.topology")


def test_every_name_in_all_resolves_to_the_thing_it_names() -> None:
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert pipeline.PipelineClient is pipeline.client.PipelineClient
    assert pipeline.SendResult is pipeline.client.SendResult
    assert pipeline.BrokerUnavailable is pipeline.client.BrokerUnavailable
    assert pipeline.AccessRefused is pipeline.io.kafka.AccessRefused
    assert pipeline.KafkaConnection is pipeline.io.kafka.KafkaConnection
    assert pipeline.SyncPipelineClient is pipeline.sync_client.SyncPipelineClient
    assert pipeline.Reader is pipeline.read.Reader
    assert pipeline.SyncReader is pipeline.read.SyncReader
    assert pipeline.Top is pipeline.read.Top
    assert pipeline.QueryError is pipeline.read.QueryError


def test_the_topology_api_is_whole() -> None:
    # whatever pipeline/topology.py offers, the package offers too
    assert set(TOPOLOGY_MODULE.__all__) <= set(pipeline.__all__)
    for name in TOPOLOGY_MODULE.__all__:
        assert getattr(pipeline, name) is getattr(TOPOLOGY_MODULE, name), name
    assert pipeline.topology is TOPOLOGY_MODULE.topology


def test_a_topology_declared_from_the_top_level() -> None:
    from pipeline import count, every, topology, total

    t = topology("t", [count("likes", "like", total(), every(60, 3600))], {"like": 0})
    assert t.name == "t"
    assert [m.name for m in t.metrics] == ["likes"]


def test_unknown_names_are_attribute_errors() -> None:
    assert not hasattr(pipeline, "no_such_name")


def test_importable_in_a_fresh_interpreter_without_loading_the_sdk_first() -> None:
    code = (
        "import sys\n"
        "import pipeline\n"
        "assert 'pipeline.client' not in sys.modules, 'the SDK loads on first use only'\n"
        "assert 'pipeline.read' not in sys.modules, 'the reader loads on first use only'\n"
        "assert 'pipeline.sync_client' not in sys.modules, 'the sync writer loads on first use only'\n"
        "assert 'redis' not in sys.modules and 'aiokafka' not in sys.modules\n"
        "from pipeline import PipelineClient, topology, count, BrokerUnavailable, SendResult, AccessRefused\n"
        "assert PipelineClient.__module__ == 'pipeline.client'\n"
        "from pipeline import SyncPipelineClient, Reader, SyncReader\n"
        "assert SyncPipelineClient.__module__ == 'pipeline.sync_client'\n"
        "assert Reader.__module__ == SyncReader.__module__ == 'pipeline.read'\n"
        "assert callable(topology) and callable(count)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
