"""mammodp.models."""
