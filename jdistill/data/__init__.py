"""Data sources: prompts, conditions and (image, text) pairs, sharded per host."""

from jdistill.data.sources import Batch, DataSource, SyntheticSource

__all__ = ["Batch", "DataSource", "SyntheticSource"]
