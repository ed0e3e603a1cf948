"""Dataset layer: read and validate preprocessed `.pt` samples, batch them, fingerprint the folder."""

from sidestep.data.dataset import (
    REQUIRED_KEYS,
    Batch,
    DatasetScan,
    DatasetSpec,
    Sample,
    collate,
    content_hash,
    dataset_hash,
    load_sample,
    scan_dataset,
)

__all__ = [
    "REQUIRED_KEYS",
    "Batch",
    "DatasetScan",
    "DatasetSpec",
    "Sample",
    "collate",
    "content_hash",
    "dataset_hash",
    "load_sample",
    "scan_dataset",
]
