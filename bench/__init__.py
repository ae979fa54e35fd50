"""Benchmarks (never part of the test suite): ``bash bench/run``; see bench/README.md."""
