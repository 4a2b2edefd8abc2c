"""Infrared small-target data sets for training and validation: (image, labels) samples of a split.

Typical use from a training script::

    splits = build_datasets("datasets", "NUAA-SIRST", base_size=256, val_split=0.1, seed=1)
    for epoch in range(epochs):
        splits.train.set_epoch(epoch)           # new, reproducible augmentation draws each epoch
        for batch in DataLoader(splits.train, batch_size=8, shuffle=True): ...
            # batch["image"]: (N, 1, 256, 256) float32 in [0, 1]; batch["mask"]: (N, 1, 256, 256) float32 in [0, 1]

Files are found and checked by ``utils.data.splits``: every problem of every split (missing or empty folders, images
without masks and masks without images, unreadable files, image/mask size mismatches) is gathered into one
``DatasetError`` raised before any training starts.

An image/mask size mismatch (NUAA-SIRST's Misc_111) is tolerated in paper mode with a ``DatasetWarning``, since
both are resized to base_size x base_size anyway (what the release does, without noticing), and rejected in
native mode, where the mask would have to be resized to the image deliberately (``allow_mask_resize=True``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.augment import flips, native_view
from utils.io.images import MASK_RESAMPLING, release_image, resize_mask_centres, resize_nearest, soft_labels, to_unit
from utils.data.splits import (DatasetError, DatasetWarning, Pair, SplitFiles, locate_split, read_pair, size_problem,
                          split_train_val, validate_split)

MODES = ("paper", "native")
AUTO_CACHE_BYTES = 1 << 30    # build_datasets caches decoded sets up to this size when cache=None


# ---------------------------------------------------------------- the Dataset

def target_pixels(labels):
    """Hard labels from the soft ``labels`` of a ``SirstDataset`` item (numpy array or tensor): the pixels at the
    mask's maximum (label 1), as the release's validation counts them ((mask / max).astype(int64))."""
    return labels >= 1.0


class SirstDataset(Dataset):
    """(image, mask) samples of one split of an infrared small-target data set.

    Each item is a dict:
        ``image``: (1, H, W) float32 in [0, 1] (any gray/RGB/RGBA, 8/16-bit file, read as gray luma);
        ``mask``:  (1, H, W) float32 labels mask / max(mask), as the release trains on (0 and 1 for a two-valued
                   mask; an all-zero mask is valid and stays zero). ``target_pixels`` gives the hard labels;
        ``stem``:  the file stem, str;
        ``size``:  (2,) int64, the image's (H, W) on disk, before any resize or crop.
    The default DataLoader collate stacks these into a batch dict (``stem`` becomes a list).

    Args:
        files: ``SplitFiles`` from ``locate_split`` (or ``split_train_val``).
        mode: ``"paper"``: the release's geometry (``utils.io.images``: the 8-bit image resized with INTER_LINEAR
            then / 255, the mask with INTER_NEAREST) to base_size x base_size, as the release trains and
            validates; ``"native"``: each image at its own size (this project's; batch 1 or use crop_size).
        base_size: side of the paper-mode square (the release: 256).
        augment: random horizontal flip, vertical flip and transpose, each with p = 0.5 (the release uses
            them for sirst_aug only). Draws come from ``numpy.random.default_rng([seed, epoch, index])``:
            reproducible, independent of DataLoader workers and shuffling; call ``set_epoch`` every epoch.
        crop_size: if set, a random crop_size x crop_size window drawn with the same generator. Paper mode: after
            the resize; smaller images are zero-padded at the bottom/right first (mask pad = 0). Native mode: a
            window at a random ``scale`` that holds a target where the frame has one
            (``utils.data.augment.native_view``; labels become hard, small targets kept).
        scale: (low, high) resize factors, drawn log-uniformly per sample, of native-mode windows; in paper mode
            of the resized frame, which is then shown in a window of the training size (crop_size, else
            base_size) that holds a target, reflect-padded where the zoomed frame is smaller (its targets then
            appear mirrored too, labelled as such): the scales of larger frames squashed to base_size.
        seed: seed of the augmentation and crop draws.
        allow_mask_resize: image/mask size mismatch policy; None: tolerated with a warning in paper mode,
            rejected in native mode; True: resize the mask (nearest) and report it; False: reject.
        cache: decode every file once, at construction, and keep the prepared arrays in memory.
        validate: check all files at construction (one ``DatasetError`` listing every problem).
        mask_resampling: how paper mode resizes masks. ``"release"``: cv2.INTER_NEAREST, as the release (source
            pixel floor(i * in / out): a small target's labels move by up to half an output pixel toward the
            top-left of the bilinearly resized image); ``"centres"``: nearest at pixel centres, aligned with the
            image (this project's option).
    """

    def __init__(self, files: SplitFiles, *, mode: str = "paper", base_size: int = 256, augment: bool = False,
                 crop_size: int | None = None, seed: int = 1, allow_mask_resize: bool | None = None,
                 cache: bool = False, validate: bool = True, mask_resampling: str = "release",
                 scale: tuple[float, float] = (1.0, 1.0)):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mask_resampling not in MASK_RESAMPLING:
            raise ValueError(f"mask_resampling must be one of {MASK_RESAMPLING}, got {mask_resampling!r}")
        self.mask_resampling = mask_resampling
        if base_size < 1 or (crop_size is not None and crop_size < 1):
            raise ValueError(f"base_size and crop_size must be positive, got {base_size}, {crop_size}")
        self.files = files
        self.name = f"{files.name}/{files.split}"
        self.pairs = list(files.pairs)
        self.mode, self.base_size, self.augment, self.crop_size, self.seed = mode, base_size, augment, crop_size, seed
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if scale != (1.0, 1.0) and mode == "native" and not crop_size:
            raise ValueError("a random scale in native mode needs a crop size (the native geometry's windows)")
        self.scale = tuple(scale)
        if allow_mask_resize is None:
            allow_mask_resize = mode == "paper"
        self.allow_mask_resize = allow_mask_resize
        self.epoch = 0
        self._cache: dict[str, tuple] | None = None
        self.notes: list[str] = []
        if validate or cache:
            self.notes, self._cache = validate_split(files, allow_mask_resize=allow_mask_resize,
                                                     read=True, keep=self._prepare if cache else None)
        else:
            self.notes, _ = validate_split(files, read=False)
        for note in self.notes:
            warnings.warn(f"{self.name}: {note}", DatasetWarning, stacklevel=2)

    @classmethod
    def from_folder(cls, root: str | Path, name: str, split: str, *, split_file: str | Path | None = None,
                    mask_suffix: str = "", **options) -> "SirstDataset":
        """``SirstDataset(locate_split(root, name, split, ...), **options)``."""
        return cls(locate_split(root, name, split, split_file=split_file, mask_suffix=mask_suffix), **options)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def stems(self) -> list[str]:
        return [pair.stem for pair in self.pairs]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (call it before each epoch's DataLoader loop; with
        ``persistent_workers=True`` the workers would not see it)."""
        self.epoch = int(epoch)

    def describe(self) -> str:
        """One line for the start-up log."""
        geometry = f"resized to {self.base_size}x{self.base_size}" if self.mode == "paper" else "native size"
        crop = f", random crop {self.crop_size}" if self.crop_size else ""
        if self.scale != (1.0, 1.0):
            crop += f" at scales {self.scale[0]:g}-{self.scale[1]:g}"
        augment = ", flips+transpose" if self.augment else ""
        cache = ", cached" if self._cache is not None else ""
        return f"{self.name}: {len(self)} images, {geometry}{crop}{augment}{cache}"

    def _prepare(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Decoded arrays (as stored on disk) -> (image (H, W) float32 in [0, 1], labels (H, W) float32 in [0, 1],
        size on disk), before augmentation.

        Paper mode is the release's geometry: the 8-bit image resized with INTER_LINEAR, then / 255; the mask
        resized with INTER_NEAREST, then labels = mask / max(mask). Native mode keeps the image's size; a mask of
        another size is brought to it at pixel centres (this project's rule), then labels = mask / max(mask)."""
        size = image.shape
        if self.mode == "paper":
            out = (self.base_size, self.base_size)
            resize = resize_nearest if self.mask_resampling == "release" else resize_mask_centres
            return release_image(image, out), soft_labels(resize(mask, out)), size
        return to_unit(image), soft_labels(resize_mask_centres(mask, image.shape)), size

    def _load(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        image, mask, problems = read_pair(pair)
        if not problems:
            problem, _ = size_problem(pair, image.shape, mask.shape, self.allow_mask_resize)
            problems += [problem] if problem else []
        if problems:
            raise DatasetError(f"data set {self.name}: " + "; ".join(problems))
        return self._prepare(image, mask)

    def _augment(self, image: np.ndarray, mask: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if (self.crop_size and self.mode == "native") or self.scale != (1.0, 1.0):
            # paper mode: the resized frame zoomed by the drawn factor, shown in a window of the training size
            image, mask = native_view(image, mask, rng, size=self.crop_size or self.base_size, scale=self.scale)
        elif self.crop_size:
            c = self.crop_size
            pad_y, pad_x = max(c - image.shape[0], 0), max(c - image.shape[1], 0)
            if pad_y or pad_x:
                image = np.pad(image, ((0, pad_y), (0, pad_x)))
                mask = np.pad(mask, ((0, pad_y), (0, pad_x)))
            top = int(rng.integers(0, image.shape[0] - c + 1))
            left = int(rng.integers(0, image.shape[1] - c + 1))
            image, mask = image[top:top + c, left:left + c], mask[top:top + c, left:left + c]
        if self.augment:
            image, mask = flips(image, mask, rng)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        if self._cache is not None:
            image, mask, size = self._cache[pair.stem]
        else:
            image, mask, size = self._load(pair)
        image, mask = self._augment(image, mask, index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],  # (H, W) -> (1, H, W)
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
            "stem": pair.stem,
            "size": torch.tensor(size, dtype=torch.int64),
        }


# ---------------------------------------------------------------- what a training script calls

class DataSplits(NamedTuple):
    """The data sets of one run; ``val`` is ``test`` itself when no val split is taken (the release
    validates on the test split)."""
    train: SirstDataset
    val: SirstDataset
    test: SirstDataset


def _estimated_bytes(n: int, base_size: int) -> int:
    return n * base_size * base_size * 8  # float32 image + float32 labels per pixel, paper mode


def build_datasets(data_root: str | Path, dataset: str, *, base_size: int = 256, augment: bool | None = None,
                   crop_size: int | None = None, val_split: float = 0.0, seed: int = 1,
                   cache: bool | None = None, allow_mask_resize: bool | None = None,
                   mode: str = "paper", mask_resampling: str = "release",
                   scale: tuple[float, float] = (1.0, 1.0)) -> DataSplits:
    """Build and check the train, val and test sets of ``<data_root>/<dataset>``.

    Args:
        data_root, dataset: the data set folder; ``demo`` is written there first if absent
            (``utils.data.synthetic_sets.ensure_demo_dataset`` with its default sizes; call it yourself first for others).
        base_size: paper-mode side (256).
        augment: flips and transpose for the train set; None: on for ``sirst_aug`` only, as in the release.
        crop_size: random crop of the train set (None: none).
        val_split: 0 validates on the test split (the release); F in (0, 1) holds out a fraction F of
            trainval, chosen by ``split_train_val(..., seed)``.
        seed: seed of the val split and of the augmentation draws.
        cache: keep decoded, resized images in memory; None: when the whole set needs under 1 GiB.
        allow_mask_resize: size-mismatch policy, see ``SirstDataset`` (None: tolerated in paper mode).
        mode: geometry of all three sets, ``"paper"`` or ``"native"`` (the train set then in windows of
            ``crop_size`` or, by default, ``base_size``; masks of another size than their image resized to it).
        scale: (low, high) random resize factors of the native train windows (``SirstDataset``).
        mask_resampling: how paper mode resizes the masks of all three sets, see ``SirstDataset``.

    Raises:
        DatasetError listing every problem of every split, before anything is returned.
    """
    if dataset == "demo" and not (Path(data_root) / dataset).exists():
        from utils.data import synthetic_sets
        synthetic_sets.ensure_demo_dataset(data_root)  # an existing demo set is used as it is, whatever its size
    if not (Path(data_root) / dataset).is_dir():
        raise DatasetError(locate_split(data_root, dataset, "trainval").problems[0])
    if augment is None:
        augment = dataset == "sirst_aug"
    trainval = locate_split(data_root, dataset, "trainval")
    test = locate_split(data_root, dataset, "test")
    if cache is None:
        cache = _estimated_bytes(len(trainval) + len(test), base_size) <= AUTO_CACHE_BYTES
    common = dict(mode=mode, base_size=base_size, seed=seed, allow_mask_resize=allow_mask_resize, cache=cache,
                  mask_resampling=mask_resampling)

    errors: list[str] = []

    def make(files: SplitFiles, **options) -> SirstDataset | None:
        try:
            return SirstDataset(files, **common, **options)
        except DatasetError as error:
            errors.append(str(error))
            return None

    if val_split and not trainval.problems and len(trainval) >= 2:
        train_files, val_files = split_train_val(trainval, val_split, seed)
    else:
        if val_split and not (trainval.problems or len(trainval) >= 2):
            errors.append(f"data set {dataset}/trainval has {len(trainval)} pair(s); --val-split needs at least 2")
        train_files, val_files = trainval, None
    if mode == "native":
        crop_size = crop_size or base_size
        if allow_mask_resize is None:
            common["allow_mask_resize"] = True
    train_set = make(train_files, augment=augment, crop_size=crop_size, scale=scale)
    val_set = make(val_files) if val_files is not None else None
    test_set = make(test)
    if errors:
        raise DatasetError("\n".join(errors))
    return DataSplits(train_set, val_set if val_set is not None else test_set, test_set)
