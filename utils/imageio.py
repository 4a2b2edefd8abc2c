"""Reading infrared frames and masks from disk, whatever their format.

Every reader here returns plain numpy arrays and raises ``ImageReadError`` naming the file when it cannot.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image or mask file that cannot be read (missing, unreadable, truncated or of an unknown layout)."""


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (suffixes in ``IMAGE_SUFFIXES``)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_raw(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError(f"{path}: not a readable image (empty, truncated or of an unsupported format); "
                             f"re-export it as PNG or remove it from the data set")
    return image


def _to_gray(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)  # ITU-R 601 luma, as PIL's convert("L")
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)  # alpha is ignored
    raise ImageReadError(f"{path}: unexpected image layout {image.shape}; expected gray, RGB or RGBA")


def read_gray(path: str | Path) -> np.ndarray:
    """Read any image as one grayscale float32 channel in [0, 1], shape (H, W).

    8-bit images are divided by 255 and 16-bit ones by 65535; float images are kept as they are
    (they must already lie in [0, 1]).
    """
    path = Path(path)
    gray = _to_gray(_read_raw(path), path)
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) / 255.0
    if gray.dtype == np.uint16:
        return gray.astype(np.float32) / 65535.0
    if gray.dtype in (np.float32, np.float64):
        gray = gray.astype(np.float32)
        if not np.isfinite(gray).all():
            raise ImageReadError(f"{path}: holds NaN or inf values")
        return gray
    raise ImageReadError(f"{path}: unsupported pixel type {gray.dtype}; use 8- or 16-bit images")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as a boolean array (H, W): any non-zero pixel is target. An all-zero mask is valid."""
    path = Path(path)
    return _to_gray(_read_raw(path), path) > 0


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (cv2.INTER_LINEAR) of a float image to ``size`` = (H, W)."""
    if image.shape == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``size`` = (H, W).

    Uses cv2.INTER_NEAREST_EXACT, which samples pixel centres as PIL's NEAREST does (plain INTER_NEAREST is
    shifted by half a pixel when shrinking).
    """
    if mask.shape == tuple(size):
        return mask
    resized = cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return resized > 0
