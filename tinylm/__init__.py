"""tinylm: a GPT-2-style language model in NumPy, with the backward pass written out."""
__version__ = "0.1.0"
