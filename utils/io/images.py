"""Reading infrared frames and masks from disk, and the resizing that the authors' release applies to them.

Every reader here returns plain numpy arrays and raises ``ImageReadError`` naming the file when it cannot.

Images are read as ``cv2.imread(path, 0)`` reads them, the release's call: one gray channel by OpenCV's own
colour conversion (alpha ignored), kept in the file's own type (uint8; uint16 for 16-bit files, which the
release would cut to 8 bits). ``to_unit`` brings them to float32 in [0, 1].

The release's geometry, used wherever the release's pipeline applies (training data
resized to the recipe's base size, ``t_models.py`` at the trained size or ``--resize``, the paper protocol):

- ``release_image``: resize the 8-bit image with ``cv2.INTER_LINEAR``, then divide by 255;
- ``resize_nearest``: ``cv2.INTER_NEAREST``, the legacy nearest neighbour (source index floor(dst * scale));
- ``soft_labels``: training labels mask / max(mask) (all zero for an empty mask);
- ``release_targets``: the scorer's labels, the pixels equal to the mask's maximum (none for an empty mask,
  which the release would turn into NaN).

The project's own geometry, where it goes beyond the release (native size, the standard protocol), resizes a
mask to its image's size with ``resize_mask_centres``: nearest neighbour at pixel centres (cv2.INTER_NEAREST_EXACT,
PIL's NEAREST), which does not shift a target by half a pixel as the legacy rule does.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

# how masks are resized to a training size: "release" (cv2.INTER_NEAREST, as the release) or "centres"
# (nearest at pixel centres, aligned with the bilinearly resized image; resize_mask_centres)
MASK_RESAMPLING = ("release", "centres")
IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
_READ_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH   # cv2.imread(path, 0), without cutting 16 bits to 8


def set_opencv_log_level(level: int) -> None:
    """OpenCV's own log level (0 silent, 3 warnings, OpenCV's start-up level); OpenCV 4 names the setter
    cv2.setLogLevel, OpenCV 5 cv2.utils.logging.setLogLevel."""
    logging = getattr(cv2.utils, "logging", None)
    (logging.setLogLevel if logging is not None else cv2.setLogLevel)(level)


def quiet_opencv() -> None:
    """Keep OpenCV's and its FFmpeg's own messages ("[ WARN:0@...] ...", "[png @ ...] ...") out of the output:
    the scripts report every file they cannot read themselves, by name."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")      # AV_LOG_QUIET, read when FFmpeg is first used
    set_opencv_log_level(0)


def refuse_to_replace(path: Path, overwrite: bool, instead: str = "choose another name") -> None:
    """Raise FileExistsError naming ``path`` when it exists and ``overwrite`` is False: nothing is replaced
    silently."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists and is kept; remove it, {instead}, "
                              f"or pass overwrite=True (--overwrite)")


def write_png(path: str | Path, image: np.ndarray, overwrite: bool = False) -> Path:
    """Write a uint8 or uint16 image (gray or BGR) as PNG, making its folder; an existing file is an error
    unless ``overwrite``."""
    path = Path(path)
    refuse_to_replace(path, overwrite, "choose another output folder")
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed for an image of shape {image.shape} and type {image.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded.tofile(str(path))   # tofile: non-ASCII paths work, as they do for reading
    return path


class ImageReadError(ValueError):
    """An image or mask file that cannot be read (missing, unreadable, truncated or of an unknown layout)."""


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (suffixes in ``IMAGE_SUFFIXES``)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: str | Path) -> np.ndarray:
    """One gray channel (H, W) as ``cv2.imread(path, 0)`` makes it, in the file's type: uint8, uint16 for
    16-bit files, float32 for float TIFFs (which must lie in [0, 1])."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    gray = cv2.imdecode(data, _READ_FLAGS) if data.size else None
    if gray is None:
        raise ImageReadError(f"{path}: not a readable image (empty, truncated or of an unsupported format); "
                             f"re-export it as PNG or move it out of its folder")
    if gray.dtype in (np.uint8, np.uint16):
        return gray
    if gray.dtype in (np.float32, np.float64):
        gray = gray.astype(np.float32)
        if not np.isfinite(gray).all():
            raise ImageReadError(f"{path}: holds NaN or inf values")
        return gray
    raise ImageReadError(f"{path}: unsupported pixel type {gray.dtype}; use 8- or 16-bit images")


def gray_as_read(image: np.ndarray) -> np.ndarray:
    """One gray channel (H, W) of an image as ``cv2.imread(path, cv2.IMREAD_UNCHANGED)`` gives it (gray (H, W) or
    (H, W, 1), BGR (H, W, 3) or BGRA (H, W, 4); uint8 or uint16), converted as ``read_image`` converts a PNG file
    holding these pixels: by the same decoder call (its colour-to-gray weights, alpha ignored), the pixels passing
    through a PNG in memory. The conversion of a PNG file whose sRGB or gAMA chunk asks the decoder to convert in
    linear light (5 of NUAA-SIRST's 427 frames) is not in its pixels: such a file reads up to 2 grey levels apart
    from its array, and only its path gives exactly what ``read_image`` gives."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a gray, BGR or BGRA image of 8 or 16 bits as cv2.IMREAD_UNCHANGED reads it, got "
                         f"{image.dtype} {image.shape}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image), [cv2.IMWRITE_PNG_COMPRESSION, 0])
    if not ok:
        raise ValueError(f"an image of shape {image.shape} and type {image.dtype} could not be converted to gray")
    return cv2.imdecode(encoded, _READ_FLAGS)


def to_unit(gray: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: 8-bit values / 255, 16-bit values / 65535; float arrays are taken as they are."""
    gray = np.asarray(gray)
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) / np.float32(255.0)
    if gray.dtype == np.uint16:
        return gray.astype(np.float32) / np.float32(65535.0)
    if gray.dtype == np.bool_:
        return gray.astype(np.float32)
    return gray.astype(np.float32, copy=False)


def read_gray(path: str | Path) -> np.ndarray:
    """Any image as one grayscale float32 channel in [0, 1], shape (H, W): ``to_unit(read_image(path))``."""
    return to_unit(read_image(path))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask (H, W) with its values as stored (read as ``read_image``). Which pixels are target is the reader's
    rule: non-zero (``mask > 0``, this project's protocols) or equal to the maximum (``release_targets``).
    An all-zero mask is valid."""
    return read_image(path)


# ----------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------

def _dsize(size: tuple[int, int]) -> tuple[int, int]:
    return int(size[1]), int(size[0])   # cv2 takes (width, height)


def resize_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.INTER_LINEAR to ``size`` = (H, W) in the array's own type (an 8-bit image stays 8-bit)."""
    if image.shape == tuple(size):
        return image
    return cv2.resize(image, _dsize(size), interpolation=cv2.INTER_LINEAR)


def release_image(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The release's network input: the image resized in its own type (uint8 from ``read_image``) with
    cv2.INTER_LINEAR, then brought to [0, 1]. float32 (H, W) = ``size``."""
    return to_unit(resize_linear(np.asarray(gray), size))


def _resize_mask(mask: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape == tuple(size):
        return mask
    source = mask.astype(np.uint8) if mask.dtype == np.bool_ else mask
    resized = cv2.resize(source, _dsize(size), interpolation=interpolation)
    return resized.astype(np.bool_) if mask.dtype == np.bool_ else resized


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.INTER_NEAREST to ``size`` = (H, W), the release's rule for masks: output pixel i reads source pixel
    floor(i * in / out)."""
    return _resize_mask(mask, size, cv2.INTER_NEAREST)


def resize_mask_centres(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour at pixel centres (cv2.INTER_NEAREST_EXACT, PIL's NEAREST) to ``size`` = (H, W): output
    pixel i reads source pixel floor((i + 0.5) * in / out). This project's rule where the release's geometry
    does not apply (a mask brought to its image's native size)."""
    return _resize_mask(mask, size, cv2.INTER_NEAREST_EXACT)


def soft_labels(mask: np.ndarray) -> np.ndarray:
    """The release's training labels: mask / max(mask) as float32 in [0, 1]; an empty mask stays all zero."""
    mask = np.asarray(mask, dtype=np.float32)
    peak = mask.max() if mask.size else 0.0
    return mask / peak if peak > 0 else np.zeros_like(mask)


def release_targets(mask: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """The release scorer's target pixels, bool (H, W): (mask / max(mask)).astype(int64) after a
    ``resize_nearest`` to ``size`` (if given), i.e. the pixels equal to the mask's maximum. An empty mask has
    no target (in the release it makes 0 / 0)."""
    mask = np.asarray(mask)
    peak = mask.max() if mask.size else 0
    resized = resize_nearest(mask, size) if size is not None else mask
    if not peak > 0:
        return np.zeros(resized.shape, dtype=np.bool_)
    return resized == peak


# ----------------------------------------------------------------------------------------------------------
# Padding to the network's size multiple
# ----------------------------------------------------------------------------------------------------------

PAD_MULTIPLE = 32   # DCONet's input sides are multiples of 32 (model.dconet.SIZE_MULTIPLE: five 2x2 poolings)


def padded_size(h: int, w: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """(H, W) rounded up to multiples of ``multiple``."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def pad_to_multiple(image: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Reflect-pad (H, W) at the bottom and right to multiples of ``multiple``, the native geometry of export and
    training. numpy reflects repeatedly when the padding is wider than the image; an image one pixel wide is
    repeated."""
    h, w = image.shape
    ph, pw = padded_size(h, w, multiple)
    if (ph, pw) == (h, w):
        return image
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(image, ((0, ph - h), (0, pw - w)), mode=mode)
