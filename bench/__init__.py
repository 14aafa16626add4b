"""Benchmarks. ``python -m bench.baseline`` measures this machine's baseline."""
