"""selfsup: distributed self-supervised pretraining on WebDataset shards."""

__version__ = "0.1.0"
