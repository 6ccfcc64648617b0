"""Migrations of the ``tidings`` app: the outbox table."""
