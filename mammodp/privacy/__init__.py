"""mammodp.privacy."""
