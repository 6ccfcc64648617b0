"""Worker applications the end-to-end benchmarks run as real processes."""
