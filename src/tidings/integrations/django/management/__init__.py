"""Management commands of the ``tidings`` app."""
