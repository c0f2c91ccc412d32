"""Benchmarks: run as ``python -m bench.train`` / ``python -m bench.sample`` from the repository root."""
