"""mammodp."""
