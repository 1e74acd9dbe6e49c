"""mammodp.metrics."""
