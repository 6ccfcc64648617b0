"""Migrations of the ``shop`` test app."""
