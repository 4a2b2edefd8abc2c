"""Frames with no target: negatives mixed into training, and held-out ones that count false targets.

A detector trained on one data set's frames has seen no clutter but that set's. ``--negatives PATH`` adds frames
that hold no target (a folder of images, or a data set in the usual layout whose masks are all empty, such as
SIRST-V2's background frames): each epoch draws ``rate`` of its samples from them, in the same geometry and
augmentation as the target frames, with all-zero labels. Part of them is held out, by whole groups of frames
(a sensor or a sequence, named by the stem without its trailing number: ``S7_12`` and ``S7_40`` are group
``S7``), so that validation can count false targets on clutter from cameras the training never saw.

    train, held_out = load_negatives("../shared/data/SIRST-V2-backgrounds", val_split=0.2, seed=1)
    mixed = MixedDataset(positives, NegativeFrames(train, ...), rate=0.25, seed=1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.augment import flips, native_view
from utils.data.splits import DatasetError
from utils.io.images import ImageReadError, list_images, read_image, read_mask, release_image, to_unit

_TRAILING_NUMBER = re.compile(r"[-_ ]?\d+$")


def frame_group(stem: str) -> str:
    """The sensor or sequence a frame belongs to: its stem without a trailing number (``S7_12`` -> ``S7``,
    ``20210725-S4-1001`` -> ``20210725-S4``); a stem that is only a number is its own group."""
    return _TRAILING_NUMBER.sub("", stem) or stem


@dataclass(frozen=True)
class NegativeFiles:
    """Image files that hold no target, and where they came from."""
    source: str
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def groups(self) -> list[str]:
        return sorted({frame_group(p.stem) for p in self.paths})


def find_negatives(path: str | Path) -> NegativeFiles:
    """The images of a folder, or of a data set's trainval split (``PATH/trainval/images``, whose masks must all
    be empty: a target in one would be trained as background)."""
    path = Path(path)
    images = path / "trainval" / "images"
    if images.is_dir():
        masks = path / "trainval" / "masks"
        for mask in (list_images(masks) if masks.is_dir() else []):
            if read_mask(mask).any():
                raise DatasetError(f"--negatives {path}: {mask} marks a target; negative frames must hold none "
                                   f"(move that frame out, or give a folder of target-free images)")
        folder = images
    elif path.is_dir():
        folder = path
    else:
        raise DatasetError(f"--negatives {path}: no such folder; give a folder of target-free images or a data "
                           f"set folder with trainval/images")
    paths = tuple(list_images(folder))
    if not paths:
        raise DatasetError(f"--negatives {path}: no images in {folder} (looked for .png, .bmp, .jpg, .tif)")
    return NegativeFiles(str(folder), paths)


def split_negatives(files: NegativeFiles, fraction: float, seed: int) -> tuple[NegativeFiles, NegativeFiles]:
    """(train, held out): whole groups (``frame_group``) taken in an order drawn from ``seed`` until at least
    ``fraction`` of the frames are held out, and at least one group is left for training."""
    if fraction <= 0:
        return files, NegativeFiles(files.source, ())
    groups = files.groups()
    if len(groups) < 2:
        raise DatasetError(f"--negative-val-split: the frames in {files.source} form one group ({groups[0]}); "
                           f"holding out whole groups needs two or more (name frames <group>_<number>)")
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    held, count = set(), 0
    sizes = {g: sum(frame_group(p.stem) == g for p in files.paths) for g in groups}
    for group in order[:-1]:
        if count >= fraction * len(files):
            break
        held.add(group)
        count += sizes[group]
    train = tuple(p for p in files.paths if frame_group(p.stem) not in held)
    val = tuple(p for p in files.paths if frame_group(p.stem) in held)
    return NegativeFiles(files.source, train), NegativeFiles(files.source, val)


def _read(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except ImageReadError as error:
        raise DatasetError(f"--negatives: {error}") from None


class NegativeFrames(Dataset):
    """Target-free frames as training samples (``SirstDataset``'s item layout, labels all zero): resized to
    ``base_size`` (``mode="paper"``; zoomed by a random ``scale`` into windows of ``crop_size`` when it is not 1,
    as ``SirstDataset`` zooms target frames) or in native-scale windows of ``crop_size`` at a random ``scale``,
    with the flips of ``augment``; with ``whole``, native mode gives each whole frame as it is (validation). Frames are
    decoded once and kept in their file's type (8 bits: a byte a pixel)."""

    def __init__(self, files: NegativeFiles, *, mode: str = "paper", base_size: int = 256,
                 crop_size: int | None = None, scale: tuple[float, float] = (1.0, 1.0), augment: bool = False,
                 seed: int = 1, whole: bool = False):
        self.files, self.mode, self.base_size, self.seed, self.whole = files, mode, base_size, seed, whole
        self.crop_size, self.scale, self.augment = crop_size or base_size, tuple(scale), augment
        self.frames = [_read(p) for p in files.paths]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.frames)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def describe(self) -> str:
        scales = f"at scales {self.scale[0]:g}-{self.scale[1]:g}"
        if self.mode == "paper":
            zoomed = not self.whole and self.scale != (1.0, 1.0)
            geometry = f"resized to {self.base_size}x{self.base_size}" + \
                (f", {scales} in windows of {self.crop_size}" if zoomed else "")
        else:
            geometry = "native size" + ("" if self.whole else f", random crop {self.crop_size} {scales}")
        groups = ", ".join(self.files.groups())
        return f"negatives {self.files.source}: {len(self)} frames ({groups}), {geometry}"

    def __getitem__(self, index: int) -> dict:
        frame = self.frames[index]
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])      # not the target frames' draws
        if self.mode == "paper":
            image = release_image(frame, (self.base_size, self.base_size))
            labels = np.zeros_like(image)
            if self.scale != (1.0, 1.0) and not self.whole:      # zoomed as the target frames are
                image, labels = native_view(image, labels, rng, size=self.crop_size, scale=self.scale)
        elif self.whole:
            image = to_unit(frame)
            labels = np.zeros_like(image)
        else:
            image = to_unit(frame)
            image, labels = native_view(image, np.zeros_like(image), rng, size=self.crop_size, scale=self.scale)
        if self.augment:
            image, labels = flips(image, labels, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                "mask": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None],
                "stem": self.files.paths[index].stem,
                "size": torch.tensor(frame.shape[:2], dtype=torch.int64)}


class MixedDataset(Dataset):
    """Target frames and negatives in one epoch: all of ``positives``, and ``round(n * rate / (1 - rate))``
    negatives, so that a fraction ``rate`` of the samples are negatives. Which negatives an epoch uses is drawn
    from (seed, epoch), cycling through all of them before any repeats."""

    def __init__(self, positives, negatives: NegativeFrames, rate: float, seed: int = 1):
        if not 0 < rate < 1:
            raise ValueError(f"negative rate must lie in (0, 1), got {rate}")
        self.positives, self.negatives, self.rate, self.seed = positives, negatives, rate, seed
        self.n_negative = max(1, round(len(positives) * rate / (1 - rate)))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.positives) + self.n_negative

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.positives.set_epoch(epoch)
        self.negatives.set_epoch(epoch)

    def describe(self) -> str:
        return (f"{self.positives.describe()}; + {self.n_negative} of {self.negatives.describe()} per epoch "
                f"({self.rate:.0%} of the samples)")

    def _negative_index(self, k: int) -> int:
        n = len(self.negatives)
        start = self.epoch * self.n_negative + k                      # position in the endless cycle
        rounds, offset = divmod(start, n)
        return int(np.random.default_rng([self.seed, rounds, 2]).permutation(n)[offset])

    def __getitem__(self, index: int) -> dict:
        if index < len(self.positives):
            return self.positives[index]
        return self.negatives[self._negative_index(index - len(self.positives))]


def build_negatives(path: str | Path, *, val_split: float, seed: int, mode: str, base_size: int,
                    crop_size: int | None, scale: tuple[float, float], augment: bool
                    ) -> tuple[NegativeFrames, NegativeFrames | None]:
    """(training negatives, held-out negatives as whole frames, or None when nothing is held out) from ``path``
    (``find_negatives``), split by ``split_negatives``."""
    train, held_out = split_negatives(find_negatives(path), val_split, seed)
    frames = NegativeFrames(train, mode=mode, base_size=base_size, crop_size=crop_size, scale=scale,
                            augment=augment, seed=seed)
    whole = NegativeFrames(held_out, mode=mode, base_size=base_size, whole=True) if len(held_out) else None
    return frames, whole
