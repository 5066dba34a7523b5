"""lmforge: train language models from zero, on a laptop CPU or a GPU cluster, with the same commands."""

__version__ = "0.1.0"
