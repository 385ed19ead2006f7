"""onepass: supervised fine-tuning with one forward pass per conversation and exact loss masks."""

__version__ = "0.1.0"
