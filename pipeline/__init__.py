"""Hierarchical aggregation pipeline for write-heavy counters."""

__version__ = "0.1.0"
