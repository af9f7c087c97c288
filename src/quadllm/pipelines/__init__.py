"""Ways to build a QUAD model: the per-layer recipe, in memory, streaming, and loading a checkpoint."""
