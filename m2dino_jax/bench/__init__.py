"""Benchmarks: `m2dino bench NAME` measures, prints a table and writes JSON."""
