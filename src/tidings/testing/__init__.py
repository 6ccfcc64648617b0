"""Helpers for testing code built on tidings, and the conformance suites adapters must pass.

Each suite lives in its own module (the inbox suite in :mod:`tidings.testing.inbox`) and needs
pytest. Nothing is imported here, so importing this package costs nothing and needs no test
dependency.
"""
