"""Benchmarks: measured straggler speedup (straggler.py) and routing overhead (overhead.py)."""
