"""Stress scenarios for the reliability guarantees (docs/reliability.md): many ranks, many hosts, kill -9.

`python -m stress` runs them with configurable counts and prints the figures; the tests run the same
scenarios with small counts (tests/test_reliability.py).
"""
