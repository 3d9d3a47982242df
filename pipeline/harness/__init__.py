"""The development harness: the demo, chaos, soak, load generation, local servers and fault plans.

It runs the pipeline (as processes) on local servers to show it, test it and break it; nothing of the
runtime (core, io, tiers, web, runtime) imports it. Local servers need the [local] extra.
"""
