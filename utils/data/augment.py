"""Training views at the frame's own scale: a random rescale and a random crop, with masks that keep small targets.

The release squashes every frame to base_size x base_size, so the network only ever sees targets at the scale
that squash gives them. The native geometry (``--geometry native``) instead rescales each sample by a factor
drawn from ``--scale-min``..``--scale-max`` (log-uniform: 0.5x and 2x equally likely) and crops a window of the
training size from it, so that a detector meets targets of a wider range of pixel sizes, as frames from other
cameras bring them.

    view = native_view(image, labels, rng, size=256, scale=(0.5, 2.0))   # (image, labels), each (256, 256)

Resampling: the image with ``cv2.INTER_AREA`` when shrinking (each output pixel the mean of the area it covers,
as a coarser sensor would see it) and ``cv2.INTER_LINEAR`` when enlarging. Labels with the same resampling give
each output pixel the fraction of it that was target; a pixel is target when that fraction is at least 0.5, and a
target whose every pixel falls under 0.5 (a 2-pixel target shrunk 2x) keeps its pixel of largest fraction, so no
target vanishes from the labels while it is still in the image. A frame smaller than the window is reflect-padded
at its bottom and right, as the export pads to multiples of 32 (``utils.io.images.pad_to_multiple``). A window on
a frame with targets always holds one (a target pixel drawn at random, the window placed at random around it);
frames without targets give windows anywhere.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)


def draw_scale(rng: np.random.Generator, scale: tuple[float, float]) -> float:
    """A factor log-uniform in [scale[0], scale[1]] (exactly scale[0] when both ends are equal)."""
    low, high = scale
    if low == high:
        return float(low)
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def rescale_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Hard labels (H, W) float32 in {0, 1} resampled to ``size`` = (H', W'), keeping every target that stays in
    the frame (module docstring). ``labels``: soft labels in [0, 1]; the pixels at 1 are the targets."""
    hard = (labels >= 1.0).astype(np.float32)
    if hard.shape == tuple(size):
        return hard
    shrink = size[0] * size[1] < hard.shape[0] * hard.shape[1]
    fraction = cv2.resize(hard, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    out = fraction >= 0.5
    touched, n = ndimage.label(fraction > 0, structure=EIGHT_CONNECTED)
    if n:
        kept = ndimage.maximum(out, touched, index=np.arange(1, n + 1))
        for index in np.flatnonzero(~kept.astype(bool)) + 1:             # targets that fell under 0.5 everywhere
            where = np.flatnonzero(touched.ravel() == index)
            out.ravel()[where[np.argmax(fraction.ravel()[where])]] = True
    return out.astype(np.float32)


def rescale_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 image (H, W) resampled to ``size``: INTER_AREA when shrinking, INTER_LINEAR when enlarging."""
    if image.shape == tuple(size):
        return image
    shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _reflect_pad(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if not (pad_h or pad_w):
        return array
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(array, ((0, pad_h), (0, pad_w)), mode=mode)


def _window_start(length: int, size: int, must_hold: int | None, rng: np.random.Generator) -> int:
    """Start of a ``size`` window in [0, length); uniform, or uniform among those that hold index ``must_hold``."""
    last = length - size
    if must_hold is None:
        return int(rng.integers(0, last + 1))
    low, high = max(0, must_hold - size + 1), min(last, must_hold)
    return int(rng.integers(low, high + 1))


def native_view(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *, size: int,
                scale: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` training window of (image, labels) at a random scale (module docstring).

    image: (H, W) float32 in [0, 1]; labels: (H, W) float32 soft labels (targets at 1). Returns float32
    (image, hard labels), both (size, size)."""
    s = draw_scale(rng, scale)
    h, w = image.shape
    out = (max(1, round(h * s)), max(1, round(w * s)))
    image, labels = rescale_image(image, out), rescale_labels(labels, out)
    image, labels = _reflect_pad(image, size), _reflect_pad(labels, size)
    targets = np.flatnonzero(labels[:out[0], :out[1]].ravel() >= 1.0)
    row = col = None
    if targets.size:
        row, col = divmod(int(targets[rng.integers(targets.size)]), out[1])
    top = _window_start(image.shape[0], size, row, rng)
    left = _window_start(image.shape[1], size, col, rng)
    return (np.ascontiguousarray(image[top:top + size, left:left + size]),
            np.ascontiguousarray(labels[top:top + size, left:left + size]))


def flips(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal flip, vertical flip and transpose, each with p = 0.5 (the release's augmentation of
    sirst_aug), the same on image and labels."""
    flip_h, flip_v, transpose = rng.random(3) < 0.5
    if flip_h:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if flip_v:
        image, labels = image[::-1, :], labels[::-1, :]
    if transpose:
        image, labels = image.T, labels.T
    return image, labels
