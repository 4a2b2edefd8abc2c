"""Finding and checking the (image, mask) pairs of a data set's split, before anything is loaded.

Layout (the release's): ``<root>/<name>/{trainval,test}/{images,masks}/<stem>.<ext>``. A mask is matched to
its image by stem, so the two may have different suffixes. Instead of the two split folders a data set may
keep all files in ``<root>/<name>/{images,masks}`` and list each split's stems in ``<root>/<name>/<split>.txt``
(or in any file passed as ``split_file``).

    files = locate_split("datasets", "NUAA-SIRST", "test")     # pairs and the problems met pairing them
    notes, _ = validate_split(files, allow_mask_resize=True)   # reads every file; one DatasetError lists all

Image/mask size mismatch (NUAA-SIRST's Misc_111.png has a 220x325 image and a 400x592 mask, a scaled copy):
``allow_mask_resize`` accepts a mask of another size with its image's aspect ratio (within 2%) and reports it
as a note; a mask whose aspect ratio differs more is never a scaled copy and is always rejected.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from utils.io.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image, read_mask

KNOWN_DATASETS = ("NUDT-SIRST", "IRSTD-1k", "sirst_aug", "NUAA-SIRST", "demo")
SPLITS = ("trainval", "test")
ASPECT_TOLERANCE = 0.02       # a resizable mask keeps its image's aspect ratio within 2%
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

def looks_like_dataset(folder: Path) -> bool:
    """Whether ``folder`` is laid out as a data set: trainval/images or test/images in it, or images/ beside a
    split file (trainval.txt or test.txt). A data set's own trainval/ and test/ folders are not data sets."""
    return (any((folder / split / "images").is_dir() for split in SPLITS)
            or ((folder / "images").is_dir() and any((folder / f"{split}.txt").is_file() for split in SPLITS)))


def available_datasets(root: str | Path) -> list[str]:
    """Names of the folders under ``root`` that look like data sets (``looks_like_dataset``; hidden ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()
                  and looks_like_dataset(p))


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
        inside = (f"; {root} is itself a data set: give its parent as --data-root and {root.name} as --dataset"
                  if looks_like_dataset(root) else "")
        problems.append(f"missing folder: {base} (data sets found under {root}: {found}){inside}; download the "
                        f"data set into that layout (see datasets/README.md) or use --dataset demo")
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


def read_pair(pair: Pair) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
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


def size_problem(pair: Pair, image_shape: tuple[int, ...], mask_shape: tuple[int, ...],
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
            for pair, (image, mask, read_problems) in zip(files.pairs, pool.map(read_pair, files.pairs)):
                problems += read_problems
                if image is None or mask is None:
                    continue
                problem, note = size_problem(pair, image.shape, mask.shape, allow_mask_resize)
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
