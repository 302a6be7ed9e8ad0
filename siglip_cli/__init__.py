"""siglip: batch image embedding and tagging with SigLIP 2, to Parquet."""

__version__ = "0.1.0"
