"""Benchmarks run by `pipeline bench ...`; results and how to read them are in docs/BENCHMARKS.md."""
