"""Benchmarks: every figure is printed next to the raw limit measured in the same run."""
