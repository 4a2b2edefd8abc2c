"""Synthetic data sets on disk: the built-in ``demo`` set that ``python run_0.py --dataset demo`` trains on.

    write_dataset("datasets", "demo", n_trainval=256, n_test=64, size=64, seed=0)
    ensure_demo_dataset("datasets")        # writes it only when absent; an existing set is used as it is

Samples come from ``utils.data.synthetic.make_sample`` (sample i of a split uses the seed sequence [seed, i]); a set is
written into a staging folder and renamed into place with a marker file, so an interrupted write never leaves a
half set behind.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from utils.io.images import write_png
from utils.data.synthetic import COMPLETE_MARKER, GENERATOR_VERSION, make_sample


def _dataset_params(n_trainval: int, n_test: int, size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "n_trainval": n_trainval, "n_test": n_test,
            "size": size, "seed": seed}


def read_marker(folder: str | Path) -> dict | None:
    """The parameters a complete synthetic data set in ``folder`` was written with, or None if it is not one."""
    marker = Path(folder) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_staging(root: Path, name: str) -> None:
    """Delete temporary folders of earlier writes of ``name`` whose process no longer runs (killed writes)."""
    for folder in root.glob(f".{name}.tmp-*"):
        try:
            pid = int(folder.name.split("-")[-2])
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def write_dataset(root: str | Path, name: str = "demo", n_trainval: int = 320, n_test: int = 80,
                  size: int = 256, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a synthetic data set in the standard layout and return its folder ``<root>/<name>``.

    Layout: ``<root>/<name>/{trainval,test}/{images,masks}/<stem>.png``, 8-bit gray images and 0/255 masks;
    stems are ``00000``, ``00001``, ... numbered across both splits (trainval first), and sample i is
    ``make_sample([seed, i], size)``, so a sample does not depend on the split sizes.

    The set is written into a hidden temporary folder next to the target, finished with the marker file
    ``SYNTHETIC_COMPLETE.json`` (holding the parameters), and then renamed into place: an interrupted
    write never leaves a folder that looks complete (temporary folders of killed writes are removed by the
    next call).

    Raises:
        FileExistsError: ``<root>/<name>`` exists and ``overwrite`` is False. An existing folder is only
            replaced when it carries the marker (it was written here); other folders are never deleted.
    """
    if n_trainval < 1 or n_test < 1:
        raise ValueError(f"need at least one image per split, got n_trainval={n_trainval}, n_test={n_test}")
    root = Path(root)
    target = root / name
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        if read_marker(target) is None:
            raise FileExistsError(f"{target} exists but was not written by write_dataset (no {COMPLETE_MARKER});"
                                  f" move it away or pick another name")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root, name)
    staging = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        def write(index: int) -> None:
            split = "trainval" if index < n_trainval else "test"
            image, mask = make_sample([seed, index], size)
            write_png(staging / split / "images" / f"{index:05d}.png", np.round(image * 255).astype(np.uint8))
            write_png(staging / split / "masks" / f"{index:05d}.png", mask.astype(np.uint8) * 255)

        for split in ("trainval", "test"):
            (staging / split / "images").mkdir(parents=True)
            (staging / split / "masks").mkdir(parents=True)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # samples are independent
            list(pool.map(write, range(n_trainval + n_test)))
        (staging / COMPLETE_MARKER).write_text(json.dumps(_dataset_params(n_trainval, n_test, size, seed), indent=1))
        if target.exists():  # overwrite=True of a marked set: move the old one aside, then swap
            retired = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# The built-in synthetic set that ``run_0.py --dataset demo`` writes and trains on: the one default of its size.
DEMO_SET = {"n_trainval": 256, "n_test": 64, "size": 64}


def ensure_demo_dataset(root: str | Path = "datasets", n_trainval: int = DEMO_SET["n_trainval"],
                        n_test: int = DEMO_SET["n_test"], size: int = DEMO_SET["size"], seed: int = 0,
                        name: str = "demo") -> Path:
    """Return ``<root>/<name>``, writing the synthetic set there first unless it is already complete.

    A complete set written with the same parameters is reused as it is; one written with other parameters
    (it carries the marker) is replaced. A folder of that name without the marker (someone's own data, or
    files put there by hand) is left alone and raises FileExistsError.
    """
    target = Path(root) / name
    wanted = _dataset_params(n_trainval, n_test, size, seed)
    found = read_marker(target)
    if found == wanted:
        return target
    if target.exists() and found is None:
        raise FileExistsError(f"{target} exists but is not a complete synthetic set (no {COMPLETE_MARKER}); "
                              f"remove it to have it written again, or use it with its own data set name")
    try:
        return write_dataset(root, name, n_trainval, n_test, size, seed, overwrite=found is not None)
    except OSError:
        if read_marker(target) == wanted:  # another process finished the same set first
            return target
        raise
