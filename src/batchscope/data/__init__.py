"""Data sets, mini-batch schedules and augmentation, all as in-memory tensors (no downloads, ever)."""

from batchscope.data.augment import augment
from batchscope.data.batching import epoch_batches
from batchscope.data.dataset import Dataset
from batchscope.data.registry import available_datasets, load_dataset

__all__ = ["Dataset", "augment", "available_datasets", "epoch_batches", "load_dataset"]
