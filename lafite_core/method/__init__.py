"""The LafitE method itself: one concept of the paper per module; no I/O beyond weight files."""
