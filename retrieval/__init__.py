"""Pure-NumPy DINOv2 image retrieval: encode images, keep vectors in SQLite + sqlite-vec, search in SQL."""

__version__ = "0.1.0"
