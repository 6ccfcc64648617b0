"""Applications the integration tests run in real worker processes."""
