"""Benchmarks: scripts that print figures (`python -m benchmarks.<name>`), not timed tests."""
