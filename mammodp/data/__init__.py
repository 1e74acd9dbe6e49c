"""mammodp.data."""
