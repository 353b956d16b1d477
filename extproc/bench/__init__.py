"""Benchmarks behind `extproc bench`."""
