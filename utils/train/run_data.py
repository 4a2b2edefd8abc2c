"""The data of a training run, as its settings describe it: the train, val and test sets in the run's geometry,
the negatives mixed into training and the held-out ones, and the data problems tolerated on the way (for the log).

    data = run_data(config)
    data.splits.train, data.splits.val      # MixedDataset when --negatives is given
    data.negatives                          # held-out negative frames (whole), or None
    data.notes                              # tolerated problems (a mask resized to its image, ...)
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

from utils.data.datasets import DataSplits, build_datasets
from utils.data.negatives import MixedDataset, NegativeFrames, build_negatives
from utils.data.splits import DatasetWarning
from utils.train.config import TrainConfig


class RunData(NamedTuple):
    splits: DataSplits
    negatives: NegativeFrames | None
    notes: list[str]


def data_mode(config: TrainConfig) -> str:
    """The data sets' mode for the run's geometry: ``paper`` (resize, the release's) or ``native``."""
    return "native" if config.geometry == "native" else "paper"


def run_data(config: TrainConfig) -> RunData:
    """Build and check the run's data sets (every problem in one ``DatasetError``); tolerated problems are
    returned as notes, other warnings passed on."""
    scale = (config.scale_min, config.scale_max)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        splits = build_datasets(config.data_root, config.dataset, base_size=config.base_size,
                                augment=config.augment_enabled(), crop_size=config.crop_size or None,
                                val_split=config.val_split, seed=config.seed, mask_resampling=config.mask_resampling,
                                mode=data_mode(config), scale=scale)
        held_out = None
        if config.negatives:
            negatives, held_out = build_negatives(config.negatives, val_split=config.negative_val_split,
                                                  seed=config.seed, mode=data_mode(config),
                                                  base_size=config.base_size, crop_size=config.crop_size or None,
                                                  scale=scale, augment=config.augment_enabled())
            splits = splits._replace(train=MixedDataset(splits.train, negatives, config.negative_rate, config.seed))
    for other in (w for w in caught if not issubclass(w.category, DatasetWarning)):
        warnings.warn(other.message, other.category)
    return RunData(splits, held_out, [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)])
