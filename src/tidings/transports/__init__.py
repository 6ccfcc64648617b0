"""Transports: the broker engines that carry events (each an optional extra, imported on use)."""
