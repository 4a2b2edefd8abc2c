"""Seeded synthetic infrared small-target images with exact masks (the ``demo`` data set is made of them).

One sample is made in four steps, one function each:

1. ``render_scene`` (``utils.data.synthetic_scene``): a sky gradient under directional clutter: cloud banks (soft, sometimes with bright rims),
   a tilted horizon with either sea (horizontal wave streaks, sun glints) or a ragged tree line, and
   building blocks with sharp edges and lit windows. Bright edges and glints are there on purpose: a plain
   threshold on intensity mistakes them for targets.
2. optics: a slight Gaussian blur of the scene.
3. ``sensor``: fixed-pattern non-uniformity (per-column gain, column and row offset stripes, a vignette)
   and temporal Gaussian noise.
4. ``_add_targets``: 0 to 3 targets (0 in about 12% of images, most have 1-3), each a Gaussian point-spread
   shape (a point source, round or elongated, or a small ellipse blurred by the PSF), added on top of the
   noisy background with amplitude A = SCR * sigma_local, where SCR (signal-to-clutter ratio) is drawn
   log-uniformly in [3, 20] and sigma_local is the standard deviation of the background in the 21x21 window
   around the target (A is at least 4 noise sigmas and 0.05).

The mask of a target is its support: the pixels where its rendered profile (normalised to peak 1) reaches
``MASK_FRACTION`` of the peak. It always holds the peak pixel, so it is never empty; its area lies in
1..``MAX_TARGET_AREA`` pixels; targets are at least ``MIN_TARGET_GAP`` pixels apart, so each is one
8-connected mask component. A target is only kept if the mean of the image over its mask exceeds the mean
of the ring around it (``ring_around``) by ``MIN_RING_CONTRAST``, so every target is locally brighter.

Everything is drawn from one ``numpy.random.Generator`` (sample i of a data set uses the seed sequence
``[seed, i]``), so the same seed gives byte-identical PNGs with the same numpy and OpenCV builds.
Images are quantised to 8 bits inside ``make_sample``, so what it returns equals what
``utils.data.synthetic_sets.write_dataset`` writes, read back with ``utils.io.images.read_gray``.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from utils.data.synthetic_scene import render_scene, sensor

GENERATOR_VERSION = 1
MASK_FRACTION = 0.3          # mask = rendered target profile >= this fraction of its peak
MAX_TARGET_AREA = 80         # pixels
MIN_TARGET_GAP = 16          # pixels between target centres
MIN_RING_CONTRAST = 2 / 255  # mean(mask) - mean(ring) of every kept target, in image units
TARGET_COUNT_P = (0.12, 0.45, 0.28, 0.15)  # probability of 0, 1, 2, 3 targets in an image
SCR_RANGE = (3.0, 20.0)
COMPLETE_MARKER = "SYNTHETIC_COMPLETE.json"

_SUPERSAMPLE = 4             # targets are rendered at 4x resolution and averaged down (sub-pixel centres)
PATCH_RADIUS = 12           # targets are rendered in a (2R+1)^2 patch
HEADROOM = 0.99             # background + target peak stays below this
MIN_AMPLITUDE = 0.05        # target peak above its background, at least (about 13 grey levels)


def as_rng(rng_or_seed: np.random.Generator | int | list[int]) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


# ---------------------------------------------------------------- targets

def target_profile(rng: np.random.Generator, sub_y: float, sub_x: float) -> np.ndarray:
    """One target's intensity profile, peak 1, shape (2R+1, 2R+1); its centre is offset by (sub_y, sub_x) px.

    Two kinds: a point source seen through a Gaussian PSF (round or elongated, any orientation), or a
    small extended object (an ellipse) blurred by a round Gaussian PSF. Both are rendered at 4x resolution
    and averaged over each pixel.
    """
    n = 2 * PATCH_RADIUS + 1
    step = 1.0 / _SUPERSAMPLE
    offsets = (np.arange(n * _SUPERSAMPLE, dtype=np.float32) + 0.5) * step - 0.5 - PATCH_RADIUS
    y, x = offsets[:, None] - sub_y, offsets[None, :] - sub_x
    angle = rng.uniform(0.0, math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    across = -x * math.sin(angle) + y * math.cos(angle)
    if rng.random() < 0.65:
        sigma = math.exp(rng.uniform(math.log(0.3), math.log(2.0)))
        elongation = rng.uniform(1.0, 2.2) if rng.random() < 0.5 else 1.0
        fine = np.exp(-0.5 * ((along / (sigma * elongation)) ** 2 + (across / sigma) ** 2))
    else:
        a = rng.uniform(1.0, 4.5)
        b = a * rng.uniform(0.35, 1.0)
        shape = ((along / a) ** 2 + (across / b) ** 2 <= 1.0).astype(np.float32)
        if not shape.any():
            shape[shape.shape[0] // 2, shape.shape[1] // 2] = 1.0
        psf = rng.uniform(0.5, 1.0) * _SUPERSAMPLE
        fine = cv2.GaussianBlur(shape, (0, 0), sigmaX=psf, sigmaY=psf, borderType=cv2.BORDER_CONSTANT)
    profile = fine.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))
    return (profile / profile.max()).astype(np.float32)


def ring_around(component: np.ndarray, inner: int = 1, outer: int = 3) -> np.ndarray:
    """The pixels between ``inner`` and ``outer`` 8-connected dilations of a boolean component, shape kept."""
    kernel = np.ones((3, 3), np.uint8)
    mask = component.astype(np.uint8)
    near = cv2.dilate(mask, kernel, iterations=inner)
    far = cv2.dilate(mask, kernel, iterations=outer)
    return (far > 0) & ~(near > 0)


def _add_targets(rng: np.random.Generator, background: np.ndarray, noise_sigma: float,
                 count: int) -> tuple[np.ndarray, np.ndarray]:
    """Place up to ``count`` targets on the background. Returns (image float32, mask bool)."""
    size_y, size_x = background.shape
    image = background.copy()
    mask = np.zeros(background.shape, bool)
    centres: list[tuple[int, int]] = []
    r = PATCH_RADIUS
    for _ in range(count):
        for _attempt in range(40):
            cy, cx = int(rng.integers(6, size_y - 6)), int(rng.integers(6, size_x - 6))
            if any((cy - y) ** 2 + (cx - x) ** 2 < MIN_TARGET_GAP ** 2 for y, x in centres):
                continue
            profile = target_profile(rng, rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
            support = profile >= MASK_FRACTION
            if not 1 <= support.sum() <= MAX_TARGET_AREA:
                continue
            # the patch (2R+1)^2 around (cy, cx), clipped to the image
            y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, size_y), max(cx - r, 0), min(cx + r + 1, size_x)
            piece = profile[y0 - cy + r:y1 - cy + r, x0 - cx + r:x1 - cx + r]
            piece_support = support[y0 - cy + r:y1 - cy + r, x0 - cx + r:x1 - cx + r]
            if piece_support.sum() != support.sum():
                continue  # part of the target would fall outside the image
            window = background[max(cy - 10, 0):cy + 11, max(cx - 10, 0):cx + 11]
            scr = math.exp(rng.uniform(*np.log(SCR_RANGE)))
            amplitude = max(scr * float(window.std()), 4.0 * noise_sigma, MIN_AMPLITUDE)
            region = background[y0:y1, x0:x1]
            amplitude = min(amplitude, HEADROOM - float(region[piece_support].max()))
            if amplitude < MIN_AMPLITUDE:
                continue  # no headroom here: the clutter is too bright
            candidate = region + amplitude * piece
            ring = ring_around(piece_support)
            if candidate[piece_support].mean() - candidate[ring].mean() < MIN_RING_CONTRAST:
                continue  # would not stand out from its surroundings (e.g. next to a bright edge)
            image[y0:y1, x0:x1] = candidate
            mask[y0:y1, x0:x1] |= piece_support
            centres.append((cy, cx))
            break
    return image, mask


# ---------------------------------------------------------------- public API

def make_sample(rng: np.random.Generator | int | list[int], size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic infrared frame and its target mask.

    Args:
        rng: a numpy Generator (consumed) or a seed (an int or a list of ints) for a fresh one.
        size: side of the square image in pixels (at least 32).

    Returns:
        image: (size, size) float32 in [0, 1], quantised to multiples of 1/255 (what an 8-bit PNG holds).
        mask: (size, size) bool, the union of the targets' supports; all False when the image has no target.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = as_rng(rng)
    scene = render_scene(rng, size)
    scene = cv2.GaussianBlur(scene, (0, 0), sigmaX=rng.uniform(0.5, 1.0), borderType=cv2.BORDER_REFLECT)
    background, noise_sigma = sensor(rng, scene)
    count = int(rng.choice(len(TARGET_COUNT_P), p=TARGET_COUNT_P))
    image, mask = _add_targets(rng, background, noise_sigma, count)
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0
    return image.astype(np.float32), mask
