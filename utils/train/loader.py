"""The training DataLoader, made once per run: its order and augmentation draws depend only on (seed, epoch), and
its worker processes (on a GPU) live across epochs instead of starting again every epoch.

    loader = make_loader(data.train, config, train=True, epoch=0, info=info, device=device)
    set_loader_epoch(loader, epoch)      # before each epoch's pass

Worker processes hold copies of the data set, so an epoch set on the data set in the main process would not reach
persistent workers; here the epoch travels with every index instead ((epoch, index) pairs, ``EpochSampler``).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.io.runtime import gpu_paths
from utils.train import distributed as dist_utils
from utils.train.config import TrainConfig


class EpochSampler(Sampler):
    """Yields (epoch, index): the indices of ``make(epoch)``, a sampler drawn anew for each epoch."""

    def __init__(self, make, epoch: int = 0):
        self.make = make
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.sampler = int(epoch), self.make(int(epoch))

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochDataset(Dataset):
    """``dataset`` read by (epoch, index): selects the epoch's augmentation draws (``set_epoch``), then reads."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def make_loader(dataset, config: TrainConfig, *, train: bool, epoch: int, info: dist_utils.DistInfo,
                device: torch.device) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): the same on a resumed run as on an unbroken one.
    drop_last=False, as the release's: the last, smaller batch is trained on and the poly schedule counts it.
    ``train``: shuffled, with the epoch's augmentation draws (``set_loader_epoch`` moves it to another epoch)."""
    gpu = gpu_paths(device)
    workers = config.workers if config.workers >= 0 else (2 if gpu else 0)
    options = dict(batch_size=config.batch_size, shuffle=False, num_workers=workers, drop_last=False,
                   pin_memory=gpu, persistent_workers=workers > 0)
    if not train:
        return DataLoader(dataset, **options)

    def make(e: int) -> Sampler:
        if info.enabled:
            sampler = torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=True,
                                                          seed=config.seed, drop_last=False)
            sampler.set_epoch(e)
            return sampler
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + e)
        return torch.utils.data.RandomSampler(dataset, generator=generator)

    dataset.set_epoch(epoch)
    return DataLoader(EpochDataset(dataset), sampler=EpochSampler(make, epoch), **options)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Make ``loader``'s next pass the given epoch's (order and augmentation draws)."""
    loader.sampler.set_epoch(epoch)
