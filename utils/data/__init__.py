"""Data: finding and checking a data set's files (both layouts), the training and validation sets in the
release's geometry, and the synthetic sets and sequences the demo and the tests use."""
from utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "splits": ("DatasetError", "DatasetWarning", "locate_split", "read_split_file", "split_train_val",
               "validate_split"),
    "datasets": ("SirstDataset", "build_datasets", "target_pixels"),
    "synthetic": ("make_sample",),
    "synthetic_sets": ("DEMO_SET", "ensure_demo_dataset", "write_dataset"),
    "synthetic_sequence": ("make_sequence", "write_sequence"),
})
