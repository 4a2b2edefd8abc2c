"""The training DataLoader: made once, its worker processes kept across epochs, each epoch's order and augmentation
draws those of a fresh loader without workers."""
from __future__ import annotations

import pytest
import torch

from utils.data.datasets import build_datasets
from utils.data.synthetic_sets import write_dataset
from utils.train.config import parse_command_line
from utils.train.distributed import DistInfo
from utils.train.loader import make_loader, set_loader_epoch


def _epochs(loader, epochs: int) -> list[list[torch.Tensor]]:
    out = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        out.append([batch["image"] for batch in loader])
    return out


@pytest.mark.slow
def test_persistent_workers_see_each_epochs_order_and_augmentation(tmp_path):
    write_dataset(tmp_path, "tiny", n_trainval=6, n_test=2, size=32, seed=3)
    cpu = torch.device("cpu")
    def config(workers: int):
        return parse_command_line(["--dataset", "tiny", "--data-root", str(tmp_path), "--batch-size", "4",
                                   "--base-size", "32", "--augment", "on", "--workers", str(workers)])[0]

    def train_set():
        return build_datasets(tmp_path, "tiny", base_size=32, augment=True, seed=1).train

    fresh = []                                  # a new loader without workers for every epoch
    for epoch in range(3):
        loader = make_loader(train_set(), config(0), train=True, epoch=epoch, info=DistInfo(), device=cpu)
        fresh.append([batch["image"] for batch in loader])
    loader = make_loader(train_set(), config(2), train=True, epoch=0, info=DistInfo(), device=cpu)
    assert loader.persistent_workers and len(loader) == 2
    kept = _epochs(loader, 3)                   # one loader, its two workers kept across the epochs
    for epoch in range(3):
        assert len(fresh[epoch]) == len(kept[epoch]) == 2
        for a, b in zip(fresh[epoch], kept[epoch]):
            assert torch.equal(a, b), epoch
    assert not torch.equal(fresh[0][0], fresh[1][0])      # another epoch, other order and draws
