"""shoal: evolve new language models out of existing open ones by model merging."""

__version__ = "0.1.0"
