"""Fuzz targets (atheris), run by tests/test_codec_atheris.py under make test-slow."""
