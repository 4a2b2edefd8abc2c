"""Infrared small-target data sets: finding, checking and loading (image, mask) pairs.

Layout (the release's): ``<root>/<name>/{trainval,test}/{images,masks}/<stem>.<ext>``. A mask is matched to
its image by stem, so the two may have different suffixes. Instead of the two split folders a data set may
keep all files in ``<root>/<name>/{images,masks}`` and list each split's stems in ``<root>/<name>/<split>.txt``
(or in any file passed as ``split_file``).

Typical use from a training script::

    splits = build_datasets("datasets", "NUAA-SIRST", base_size=256, val_split=0.1, seed=1)
    for epoch in range(epochs):
        splits.train.set_epoch(epoch)           # new, reproducible augmentation draws each epoch
        for batch in DataLoader(splits.train, batch_size=8, shuffle=True): ...
            # batch["image"]: (N, 1, 256, 256) float32 in [0, 1]; batch["mask"]: (N, 1, 256, 256) float32 in [0, 1]

Every data set is checked when it is built: all problems (missing or empty folders, images without masks and
masks without images, unreadable files, image/mask size mismatches) are gathered into one ``DatasetError``
raised before any training starts.

Image/mask size mismatch (NUAA-SIRST's Misc_111.png has a 220x325 image and a 400x592 mask, a scaled copy):
``allow_mask_resize=None`` (the default) tolerates it in paper mode with a ``DatasetWarning``, since both are
resized to base_size x base_size anyway (what the release does, without noticing), and rejects it in native
mode, where the mask would have to be resized to the image deliberately: pass ``allow_mask_resize=True``
there (it is then resized with nearest neighbours and reported), or False to reject it in every mode.
A mask whose aspect ratio differs from its image's by more than 2% is never a scaled copy and is always rejected.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.imageio import (IMAGE_SUFFIXES, ImageReadError, list_images, read_image, read_mask, release_image,
                           resize_mask_centres, resize_nearest, soft_labels, to_unit)

KNOWN_DATASETS = ("NUDT-SIRST", "IRSTD-1k", "sirst_aug", "NUAA-SIRST", "demo")
SPLITS = ("trainval", "test")
MODES = ("paper", "native")
ASPECT_TOLERANCE = 0.02       # a resizable mask keeps its image's aspect ratio within 2%
AUTO_CACHE_BYTES = 1 << 30    # build_datasets caches decoded sets up to this size when cache=None
_MAX_LISTED = 200             # problems listed in one error message


class DatasetError(ValueError):
    """A data set that cannot be used as it is; the message lists every offending file and what to do."""


class DatasetWarning(UserWarning):
    """Something in a data set that was tolerated (e.g. a mask resized to its image)."""


@dataclass(frozen=True)
class Pair:
    """One image file and its mask file, matched by ``stem``."""
    stem: str
    image: Path
    mask: Path


@dataclass
class SplitFiles:
    """The (image, mask) pairs of one split as found on disk, with the problems met while pairing them.

    ``problems`` holds one line per issue (missing folder, unpaired file, ...); ``validate_split`` adds the
    read and size problems and raises them all together.
    """
    name: str
    split: str
    source: str                       # where the list came from: a folder or a split file
    pairs: list[Pair]
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def stems(self) -> list[str]:
        return [pair.stem for pair in self.pairs]


# ---------------------------------------------------------------- finding files

def available_datasets(root: str | Path) -> list[str]:
    """Names of the folders under ``root`` that look like data sets (hidden folders are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_split_file(path: str | Path) -> list[str]:
    """Stems listed in a split file: one per line; blank lines and ``#`` comments are skipped, and a known
    image suffix (``Misc_1.png``) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    stems = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        stems.append(Path(line).stem if Path(line).suffix.lower() in IMAGE_SUFFIXES else line)
    return stems


def _by_stem(folder: Path, suffix: str, problems: list[str]) -> dict[str, Path]:
    """Image files in ``folder`` keyed by stem (minus ``suffix``); a stem found twice is a problem."""
    files: dict[str, Path] = {}
    for path in list_images(folder):
        stem = path.stem[: len(path.stem) - len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        if stem in files:
            problems.append(f"two files for stem {stem!r}: {files[stem]} and {path}; keep one")
            continue
        files[stem] = path
    return files


def _check_folder(folder: Path, problems: list[str]) -> bool:
    if not folder.is_dir():
        problems.append(f"missing folder: {folder}")
        return False
    if not list_images(folder):
        problems.append(f"empty folder: {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return False
    return True


def locate_split(root: str | Path, name: str, split: str, *, split_file: str | Path | None = None,
                 mask_suffix: str = "") -> SplitFiles:
    """Find the (image, mask) pairs of one split without reading them.

    Args:
        root: folder holding the data sets (e.g. ``datasets``).
        name: data set folder name (``KNOWN_DATASETS`` or any folder in the layout).
        split: ``"trainval"`` or ``"test"`` (any name works with split files).
        split_file: a file listing the split's stems; its files are then looked up in
            ``<root>/<name>/{images,masks}``. Without it, ``<root>/<name>/<split>/{images,masks}`` is used
            when it exists, else ``<root>/<name>/<split>.txt`` with ``<root>/<name>/{images,masks}``.
        mask_suffix: text after the stem in mask names (``"_pixels0"`` for the original SIRST release).

    Returns a ``SplitFiles`` whose ``problems`` list what is wrong; nothing is raised here.
    """
    root = Path(root)
    base = root / name
    problems: list[str] = []
    if not base.is_dir():
        found = ", ".join(available_datasets(root)) or "none"
        problems.append(f"missing folder: {base} (data sets found under {root}: {found}); download the data set "
                        f"into that layout (see datasets/README.md) or use --dataset demo")
        return SplitFiles(name, split, str(base), [], problems)

    folder_layout = base / split
    if split_file is None and not folder_layout.is_dir() and (base / f"{split}.txt").is_file():
        split_file = base / f"{split}.txt"
    if split_file is None and not folder_layout.is_dir():
        problems.append(f"missing folder: {folder_layout} (nor is there a split file {base / (split + '.txt')}); "
                        f"expected {folder_layout}/images and {folder_layout}/masks")
        return SplitFiles(name, split, str(folder_layout), [], problems)
    if split_file is None:
        image_dir, mask_dir, wanted, source = folder_layout / "images", folder_layout / "masks", None, folder_layout
    else:
        image_dir, mask_dir, source = base / "images", base / "masks", Path(split_file)
        try:
            wanted = read_split_file(split_file)
        except DatasetError as error:
            problems.append(str(error))
            return SplitFiles(name, split, str(source), [], problems)
        if not wanted:
            problems.append(f"empty split file: {split_file} lists no stems")

    if not (_check_folder(image_dir, problems) & _check_folder(mask_dir, problems)):
        return SplitFiles(name, split, str(source), [], problems)
    images = _by_stem(image_dir, "", problems)
    masks = _by_stem(mask_dir, mask_suffix, problems)

    if wanted is None:
        wanted = sorted(images)
        problems += [f"mask without image: {masks[stem]} (no {stem}.* in {image_dir}); remove it or add the image"
                     for stem in sorted(set(masks) - set(images))]
    else:
        seen: set[str] = set()
        for stem in wanted:
            if stem in seen:
                problems.append(f"stem {stem!r} listed twice in {split_file}")
            seen.add(stem)
            if stem not in images:
                problems.append(f"listed in {split_file} but no image: {image_dir / stem}.* is missing")
        wanted = sorted(seen & set(images))
    pairs = []
    for stem in wanted:
        if stem not in masks:
            problems.append(f"image without mask: {images[stem]} (expected {mask_dir / (stem + mask_suffix)}.png "
                            f"or another image suffix); add the mask or remove the image")
            continue
        pairs.append(Pair(stem, images[stem], masks[stem]))
    return SplitFiles(name, split, str(source), pairs, problems)


# ---------------------------------------------------------------- reading and checking

def _same_aspect(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) <= ASPECT_TOLERANCE


def _read_pair(pair: Pair) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    image = mask = None
    problems = []
    try:
        image = read_image(pair.image)
    except ImageReadError as error:
        problems.append(f"unreadable image: {error}")
    try:
        mask = read_mask(pair.mask)
    except ImageReadError as error:
        problems.append(f"unreadable mask: {error}")
    return image, mask, problems


def _size_problem(pair: Pair, image_shape: tuple[int, ...], mask_shape: tuple[int, ...],
                  allow_mask_resize: bool) -> tuple[str | None, str | None]:
    """(problem, note) for an image/mask size mismatch; both None when the sizes agree."""
    if image_shape == mask_shape:
        return None, None
    sizes = (f"image {pair.image} is {image_shape[0]}x{image_shape[1]} (HxW) but its mask {pair.mask} is "
             f"{mask_shape[0]}x{mask_shape[1]}")
    if not _same_aspect(image_shape, mask_shape):
        return f"size mismatch: {sizes}, a different aspect ratio, so not a scaled copy; fix the mask", None
    if not allow_mask_resize:
        return (f"size mismatch: {sizes}; if the mask is a scaled copy pass allow_mask_resize=True "
                f"(it is then resized to the image, nearest neighbour), else fix the mask"), None
    return None, f"size mismatch tolerated, the mask is resized with nearest neighbours: {sizes}"


def validate_split(files: SplitFiles, *, allow_mask_resize: bool = False, read: bool = True,
                   keep: Callable[[np.ndarray, np.ndarray], tuple] | None = None,
                   workers: int | None = None) -> tuple[list[str], dict[str, tuple] | None]:
    """Check one split and raise a single ``DatasetError`` listing every problem found.

    Args:
        files: from ``locate_split``; its pairing problems are reported together with the ones found here.
        allow_mask_resize: accept a mask of another size than its image when it has the same aspect ratio.
        read: decode every image and mask (finds unreadable, truncated and mismatched files). With False only
            the pairing is checked; file errors then surface when a sample is loaded.
        keep: if given, ``keep(image, mask)`` is called on each decoded pair and its results are returned,
            keyed by stem (used by ``SirstDataset`` to fill its cache during the check).
        workers: decoding threads (default: up to 4, the CPU count).

    Returns:
        (notes, kept): ``notes`` are the tolerated issues (one line each, e.g. a resized mask);
        ``kept`` is None without ``keep``.
    """
    problems = list(files.problems)
    if not files.pairs and not problems:
        problems.append(f"no (image, mask) pairs in {files.source}")
    notes: list[str] = []
    kept: dict[str, tuple] | None = {} if keep is not None else None
    if read and files.pairs:
        workers = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 decodes without holding the GIL
            for pair, (image, mask, read_problems) in zip(files.pairs, pool.map(_read_pair, files.pairs)):
                problems += read_problems
                if image is None or mask is None:
                    continue
                problem, note = _size_problem(pair, image.shape, mask.shape, allow_mask_resize)
                if problem:
                    problems.append(problem)
                    continue
                if note:
                    notes.append(note)
                if kept is not None:
                    kept[pair.stem] = keep(image, mask)
    if problems:
        listed = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            listed.append(f"... and {len(problems) - _MAX_LISTED} more")
        raise DatasetError(f"data set {files.name}/{files.split} ({files.source}): {len(problems)} problem(s); "
                           f"fix them before training:\n  - " + "\n  - ".join(listed))
    return notes, kept


def split_train_val(files: SplitFiles, fraction: float, seed: int = 1) -> tuple[SplitFiles, SplitFiles]:
    """Split ``files`` into (train, val) with ``round(fraction * n)`` validation pairs (at least 1, and at least
    1 left for training), drawn with ``numpy.random.default_rng(seed)`` over the pairs sorted by stem, so the
    result depends only on the stems, the fraction and the seed."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must lie in (0, 1), got {fraction}")
    pairs = sorted(files.pairs, key=lambda pair: pair.stem)
    if len(pairs) < 2:
        raise DatasetError(f"data set {files.name}/{files.split} has {len(pairs)} pair(s); "
                           f"a train/val split needs at least 2")
    n_val = min(max(round(fraction * len(pairs)), 1), len(pairs) - 1)
    order = np.random.default_rng(seed).permutation(len(pairs))
    val_index = set(order[:n_val].tolist())
    train = [pair for i, pair in enumerate(pairs) if i not in val_index]
    val = [pair for i, pair in enumerate(pairs) if i in val_index]
    return (replace(files, split=f"{files.split}[train]", pairs=train),
            replace(files, split=f"{files.split}[val]", pairs=val))


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
        mode: ``"paper"``: the release's geometry (``utils.imageio``: the 8-bit image resized with INTER_LINEAR
            then / 255, the mask with INTER_NEAREST) to base_size x base_size, as the release trains and
            validates; ``"native"``: each image at its own size (this project's; batch 1 or use crop_size).
        base_size: side of the paper-mode square (the release: 256).
        augment: random horizontal flip, vertical flip and transpose, each with p = 0.5 (the release uses
            them for sirst_aug only). Draws come from ``numpy.random.default_rng([seed, epoch, index])``:
            reproducible, independent of DataLoader workers and shuffling; call ``set_epoch`` every epoch.
        crop_size: if set, a random crop_size x crop_size window (after the paper-mode resize), drawn with
            the same generator; smaller images are zero-padded at the bottom/right first (mask pad = 0).
        seed: seed of the augmentation and crop draws.
        allow_mask_resize: image/mask size mismatch policy; None: tolerated with a warning in paper mode,
            rejected in native mode; True: resize the mask (nearest) and report it; False: reject.
        cache: decode every file once, at construction, and keep the prepared arrays in memory.
        validate: check all files at construction (one ``DatasetError`` listing every problem).
    """

    def __init__(self, files: SplitFiles, *, mode: str = "paper", base_size: int = 256, augment: bool = False,
                 crop_size: int | None = None, seed: int = 1, allow_mask_resize: bool | None = None,
                 cache: bool = False, validate: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if base_size < 1 or (crop_size is not None and crop_size < 1):
            raise ValueError(f"base_size and crop_size must be positive, got {base_size}, {crop_size}")
        self.files = files
        self.name = f"{files.name}/{files.split}"
        self.pairs = list(files.pairs)
        self.mode, self.base_size, self.augment, self.crop_size, self.seed = mode, base_size, augment, crop_size, seed
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
            return release_image(image, out), soft_labels(resize_nearest(mask, out)), size
        return to_unit(image), soft_labels(resize_mask_centres(mask, image.shape)), size

    def _load(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        image, mask, problems = _read_pair(pair)
        if not problems:
            problem, _ = _size_problem(pair, image.shape, mask.shape, self.allow_mask_resize)
            problems += [problem] if problem else []
        if problems:
            raise DatasetError(f"data set {self.name}: " + "; ".join(problems))
        return self._prepare(image, mask)

    def _augment(self, image: np.ndarray, mask: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.crop_size:
            c = self.crop_size
            pad_y, pad_x = max(c - image.shape[0], 0), max(c - image.shape[1], 0)
            if pad_y or pad_x:
                image = np.pad(image, ((0, pad_y), (0, pad_x)))
                mask = np.pad(mask, ((0, pad_y), (0, pad_x)))
            top = int(rng.integers(0, image.shape[0] - c + 1))
            left = int(rng.integers(0, image.shape[1] - c + 1))
            image, mask = image[top:top + c, left:left + c], mask[top:top + c, left:left + c]
        if self.augment:
            flip_h, flip_v, transpose = rng.random(3) < 0.5
            if flip_h:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if flip_v:
                image, mask = image[::-1, :], mask[::-1, :]
            if transpose:
                image, mask = image.T, mask.T
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
                   mode: str = "paper") -> DataSplits:
    """Build and check the train, val and test sets of ``<data_root>/<dataset>``.

    Args:
        data_root, dataset: the data set folder; ``demo`` is written there first if absent
            (``utils.synthetic.ensure_demo_dataset`` with its default sizes; call it yourself first for others).
        base_size: paper-mode side (256).
        augment: flips and transpose for the train set; None: on for ``sirst_aug`` only, as in the release.
        crop_size: random crop of the train set (None: none).
        val_split: 0 validates on the test split (the release); F in (0, 1) holds out a fraction F of
            trainval, chosen by ``split_train_val(..., seed)``.
        seed: seed of the val split and of the augmentation draws.
        cache: keep decoded, resized images in memory; None: when the whole set needs under 1 GiB.
        allow_mask_resize: size-mismatch policy, see ``SirstDataset`` (None: tolerated in paper mode).
        mode: geometry of all three sets, ``"paper"`` or ``"native"``.

    Raises:
        DatasetError listing every problem of every split, before anything is returned.
    """
    if dataset == "demo" and not (Path(data_root) / dataset).exists():
        from utils import synthetic
        synthetic.ensure_demo_dataset(data_root)  # an existing demo set is used as it is, whatever its size
    if not (Path(data_root) / dataset).is_dir():
        raise DatasetError(locate_split(data_root, dataset, "trainval").problems[0])
    if augment is None:
        augment = dataset == "sirst_aug"
    trainval = locate_split(data_root, dataset, "trainval")
    test = locate_split(data_root, dataset, "test")
    if cache is None:
        cache = _estimated_bytes(len(trainval) + len(test), base_size) <= AUTO_CACHE_BYTES
    common = dict(mode=mode, base_size=base_size, seed=seed, allow_mask_resize=allow_mask_resize, cache=cache)

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
    train_set = make(train_files, augment=augment, crop_size=crop_size)
    val_set = make(val_files) if val_files is not None else None
    test_set = make(test)
    if errors:
        raise DatasetError("\n".join(errors))
    return DataSplits(train_set, val_set if val_set is not None else test_set, test_set)
