"""Evolutionary search over merge recipes: the search file, the genome, the optimizer and the trial loop."""
