"""mammodp.stages."""
