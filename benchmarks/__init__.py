"""Side-by-side benchmarks of tidings against the approaches it replaces (`make bench`)."""
