"""Data-flow merging: a path through the layers of several parents, run live or exported as a plain checkpoint."""
