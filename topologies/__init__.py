"""Shipped topologies; `pipeline run NAME` loads `topologies.NAME.TOPOLOGY`."""
