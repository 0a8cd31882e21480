"""Benchmarks: `python -m bench [--scale S]`."""
