"""A Django app with a ``handlers`` module, for the handler-discovery test."""
