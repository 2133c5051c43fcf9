"""Data: the default Fashion-MNIST set in memory, and whole-batch loading."""

from delving.data.batches import InMemoryBatches, batch_flip, batch_translate, channel_stats
from delving.data.fashion_mnist import CLASSES, DatasetError, fetch, load_fashion_mnist, locate

__all__ = ["CLASSES", "DatasetError", "InMemoryBatches", "batch_flip", "batch_translate",
           "channel_stats", "fetch", "load_fashion_mnist", "locate"]
