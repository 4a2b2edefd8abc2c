"""Seeded synthetic infrared small-target images with exact masks: the ``demo`` data set.

One sample is made in four steps, one function each:

1. ``_scene``: a sky gradient under directional clutter: cloud banks (soft, sometimes with bright rims),
   a tilted horizon with either sea (horizontal wave streaks, sun glints) or a ragged tree line, and
   building blocks with sharp edges and lit windows. Bright edges and glints are there on purpose: a plain
   threshold on intensity mistakes them for targets.
2. optics: a slight Gaussian blur of the scene.
3. ``_sensor``: fixed-pattern non-uniformity (per-column gain, column and row offset stripes, a vignette)
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
Images are quantised to 8 bits inside ``make_sample``, so what it returns equals what ``write_dataset``
writes, read back with ``utils.imageio.read_gray``.

Sequences (``make_sequence``, ``write_sequence``) reuse these steps for video: one scene with its optics and
fixed pattern as a fixed background, fresh temporal noise in every frame, and 1 to 3 targets of fixed shape and
amplitude moving along straight lines at sub-pixel speeds, each rendered at its sub-pixel position in every
frame. Their truth is per frame: a label map of the targets' masks and each target's id and (x, y) centre.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GENERATOR_VERSION = 1
MASK_FRACTION = 0.3          # mask = rendered target profile >= this fraction of its peak
MAX_TARGET_AREA = 80         # pixels
MIN_TARGET_GAP = 16          # pixels between target centres
MIN_RING_CONTRAST = 2 / 255  # mean(mask) - mean(ring) of every kept target, in image units
TARGET_COUNT_P = (0.12, 0.45, 0.28, 0.15)  # probability of 0, 1, 2, 3 targets in an image
SCR_RANGE = (3.0, 20.0)
COMPLETE_MARKER = "SYNTHETIC_COMPLETE.json"

_SUPERSAMPLE = 4             # targets are rendered at 4x resolution and averaged down (sub-pixel centres)
_PATCH_RADIUS = 12           # targets are rendered in a (2R+1)^2 patch
_HEADROOM = 0.99             # background + target peak stays below this
_MIN_AMPLITUDE = 0.05        # target peak above its background, at least (about 13 grey levels)


def _as_rng(rng_or_seed: np.random.Generator | int | list[int]) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


# ---------------------------------------------------------------- noise fields

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-std noise smooth at the scale of a (cells_y, cells_x) grid, shape (H, W) float32."""
    cy, cx = max(int(cells[0]), 2), max(int(cells[1]), 2)
    low = rng.standard_normal((cy + 2, cx + 2)).astype(np.float32)
    big = cv2.resize(low, (shape[1] + 2 * (shape[1] // cx), shape[0] + 2 * (shape[0] // cy)),
                     interpolation=cv2.INTER_CUBIC)
    top, left = shape[0] // cy, shape[1] // cx  # drop the outer cells, where cubic interpolation flattens out
    field = big[top:top + shape[0], left:left + shape[1]]
    return (field - field.mean()) / (field.std() + 1e-6)


def _fbm(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int], octaves: int = 4) -> np.ndarray:
    """Fractal noise: octaves of ``_smooth_noise`` at doubling frequency and halving amplitude, unit std."""
    field = np.zeros(shape, np.float32)
    for octave in range(octaves):
        scale = 2 ** octave
        grid = (min(cells[0] * scale, shape[0] // 2), min(cells[1] * scale, shape[1] // 2))
        field += 0.5 ** octave * _smooth_noise(rng, shape, grid)
    return field / (field.std() + 1e-6)


def _directional(rng: np.random.Generator, size: int, cells_along: int, cells_across: int, angle_deg: float,
                 octaves: int = 3, coarse: bool = True) -> np.ndarray:
    """Fractal noise stretched along a direction (angle from the horizontal), shape (size, size).

    With ``coarse`` the field is made at half resolution and upsampled (smooth fields lose nothing; 4x faster).
    """
    work = size // 2 if coarse else size
    canvas = int(math.ceil(work * 1.45))  # a rotated square of side `work` fits in it
    field = _fbm(rng, (canvas, canvas), (cells_across, cells_along), octaves)
    rotation = cv2.getRotationMatrix2D((canvas / 2, canvas / 2), angle_deg, 1.0)
    rotation[:, 2] -= (canvas - work) / 2  # centre of the canvas -> centre of the output
    field = cv2.warpAffine(field, rotation, (work, work), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return _upsample(field, size)


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    if field.shape == (size, size):
        return field
    return cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)


def _blob(size: int, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    """An axis-aligned Gaussian bump of peak 1, shape (size, size)."""
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    return np.exp(-0.5 * (((y - cy) / sy) ** 2 + ((x - cx) / sx) ** 2)).astype(np.float32)


# ---------------------------------------------------------------- scene

def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise-free background radiance, shape (size, size) float32, roughly within [0.02, 0.8]."""
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    sky_level = rng.uniform(0.1, 0.4)
    scene = np.repeat(sky_level + rng.uniform(-0.05, 0.15) * rows, size, axis=1)  # sky warms towards the horizon

    if rng.random() < 0.75:  # cloud banks, stretched along a direction
        bank = _directional(rng, size, int(rng.integers(2, 4)), int(rng.integers(6, 14)), rng.uniform(-30, 30))
        detail = _upsample(_fbm(rng, (size // 2, size // 2), (8, 8), 3), size)
        cover = np.clip((bank - rng.uniform(-0.5, 1.2)) / rng.uniform(0.05, 0.5), 0.0, 1.0)
        scene += cover * rng.uniform(0.08, 0.4) * (1.0 + 0.25 * detail)
        if rng.random() < 0.5:  # sun-lit rims at the cloud edges
            scene += rng.uniform(0.05, 0.2) * 4.0 * cover * (1.0 - cover)

    horizon = None
    if rng.random() < 0.6:
        x = np.arange(size, dtype=np.float32)
        tilt = rng.uniform(-6, 6)
        horizon = rng.uniform(0.45, 0.85) * size + math.tan(math.radians(tilt)) * (x - size / 2)  # row per column
        rows_px = np.arange(size, dtype=np.float32)[:, None]
        level_at_horizon = sky_level + rng.uniform(-0.15, 0.25)
        if rng.random() < 0.5:  # sea: horizontal wave streaks and a few sun glints
            below = rows_px > horizon[None, :]
            streaks = _directional(rng, size, int(rng.integers(2, 5)), int(rng.integers(40, 90)), -tilt,
                                  octaves=2, coarse=False)
            sea = level_at_horizon - rng.uniform(0.0, 0.15) * rows + rng.uniform(0.01, 0.05) * streaks
            if rng.random() < 0.4:
                for _ in range(int(rng.integers(3, 25))):
                    cx = rng.uniform(0, size)
                    cy = rng.uniform(horizon[int(min(cx, size - 1))] + 3, size)
                    sea += rng.uniform(0.04, 0.15) * _blob(size, cy, cx, rng.uniform(0.6, 1.2), rng.uniform(1.5, 4.0))
            scene = np.where(below, sea, scene)
        else:  # land under a ragged tree line
            crowns = np.abs(_smooth_noise(rng, (1, size), (2, int(rng.integers(12, 40))))[0])
            hills = _smooth_noise(rng, (1, size), (2, 4))[0]
            edge = horizon - rng.uniform(3, 25) * crowns - rng.uniform(0, 10) * hills
            below = rows_px > edge[None, :]
            texture = _upsample(_fbm(rng, (size // 2, size // 2), (6, 12), 3), size)
            ground = level_at_horizon + rng.uniform(0.02, 0.06) * texture
            scene = np.where(below, ground, scene)

    if rng.random() < 0.35:  # buildings: blocks with sharp edges standing on the horizon (or the bottom)
        for _ in range(int(rng.integers(1, 5))):
            width, height = int(rng.integers(15, 70)), int(rng.integers(20, 120))
            left = int(rng.integers(-width // 2, size - width // 2))
            l0, l1 = max(left, 0), min(left + width, size)
            if l1 - l0 < 4:
                continue
            base = int(horizon[(l0 + l1) // 2] + rng.uniform(0, 10)) if horizon is not None else size
            base = min(base, size)
            top = max(base - height, 0)
            if base - top < 4:
                continue
            block = rng.uniform(0.05, 0.6) + rng.uniform(-0.05, 0.05) * np.linspace(0, 1, base - top)[:, None]
            scene[top:base, l0:l1] = block
            if rng.random() < 0.5:  # lit windows: small bright rectangles on a grid
                wh, ww = int(rng.integers(2, 5)), int(rng.integers(2, 5))
                step_y, step_x = wh + int(rng.integers(4, 9)), ww + int(rng.integers(4, 9))
                glow = rng.uniform(0.03, 0.15)
                for wy in range(top + 3, base - wh - 2, step_y):
                    for wx in range(l0 + 3, l1 - ww - 2, step_x):
                        if rng.random() < 0.4:
                            scene[wy:wy + wh, wx:wx + ww] += glow

    low, high = float(scene.min()), float(scene.max())
    ceiling = rng.uniform(0.6, 0.8)  # leave headroom above the brightest clutter for targets
    if high > ceiling:
        floor = min(low, ceiling - 0.1)
        scene = floor + (scene - floor) * (ceiling - floor) / (high - floor)
    return np.clip(scene, 0.02, 1.0).astype(np.float32)


@dataclass(frozen=True)
class _FixedPattern:
    """A sensor's fixed-pattern non-uniformity: per-column gain, column and row offsets, a vignette."""

    column_gain: np.ndarray    # (W,) float32
    column_offset: np.ndarray  # (W,) float32
    row_offset: np.ndarray     # (H,) float32
    vignette: np.ndarray       # (H, W) float32

    def apply(self, scene: np.ndarray) -> np.ndarray:
        """The scene as the sensor sees it before temporal noise, float32 (H, W)."""
        gained = scene * self.column_gain[None, :] * self.vignette
        return gained + self.column_offset[None, :] + self.row_offset[:, None]


def _fixed_pattern(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[_FixedPattern, float]:
    """Draw a sensor: its fixed pattern and its temporal noise sigma."""
    size_y, size_x = shape
    column_gain = 1.0 + rng.normal(0.0, rng.uniform(0.005, 0.03), size_x).astype(np.float32)
    column_offset = rng.normal(0.0, rng.uniform(0.002, 0.012), size_x).astype(np.float32)
    row_offset = rng.normal(0.0, rng.uniform(0.0, 0.006), size_y).astype(np.float32)
    y = np.linspace(-1, 1, size_y, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, size_x, dtype=np.float32)[None, :]
    vignette = 1.0 - rng.uniform(0.0, 0.15) * (x ** 2 + y ** 2) / 2
    noise_sigma = float(rng.uniform(0.003, 0.015))
    return _FixedPattern(column_gain, column_offset, row_offset, vignette), noise_sigma


def _sensor(rng: np.random.Generator, scene: np.ndarray) -> tuple[np.ndarray, float]:
    """Apply fixed-pattern non-uniformity and temporal noise. Returns (background, temporal noise sigma)."""
    pattern, noise_sigma = _fixed_pattern(rng, scene.shape)
    noise = rng.normal(0.0, noise_sigma, scene.shape).astype(np.float32)
    background = pattern.apply(scene) + noise
    return background.astype(np.float32), noise_sigma


# ---------------------------------------------------------------- targets

def _target_profile(rng: np.random.Generator, sub_y: float, sub_x: float) -> np.ndarray:
    """One target's intensity profile, peak 1, shape (2R+1, 2R+1); its centre is offset by (sub_y, sub_x) px.

    Two kinds: a point source seen through a Gaussian PSF (round or elongated, any orientation), or a
    small extended object (an ellipse) blurred by a round Gaussian PSF. Both are rendered at 4x resolution
    and averaged over each pixel.
    """
    n = 2 * _PATCH_RADIUS + 1
    step = 1.0 / _SUPERSAMPLE
    offsets = (np.arange(n * _SUPERSAMPLE, dtype=np.float32) + 0.5) * step - 0.5 - _PATCH_RADIUS
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
    r = _PATCH_RADIUS
    for _ in range(count):
        for _attempt in range(40):
            cy, cx = int(rng.integers(6, size_y - 6)), int(rng.integers(6, size_x - 6))
            if any((cy - y) ** 2 + (cx - x) ** 2 < MIN_TARGET_GAP ** 2 for y, x in centres):
                continue
            profile = _target_profile(rng, rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
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
            amplitude = max(scr * float(window.std()), 4.0 * noise_sigma, _MIN_AMPLITUDE)
            region = background[y0:y1, x0:x1]
            amplitude = min(amplitude, _HEADROOM - float(region[piece_support].max()))
            if amplitude < _MIN_AMPLITUDE:
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
    rng = _as_rng(rng)
    scene = _scene(rng, size)
    scene = cv2.GaussianBlur(scene, (0, 0), sigmaX=rng.uniform(0.5, 1.0), borderType=cv2.BORDER_REFLECT)
    background, noise_sigma = _sensor(rng, scene)
    count = int(rng.choice(len(TARGET_COUNT_P), p=TARGET_COUNT_P))
    image, mask = _add_targets(rng, background, noise_sigma, count)
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0
    return image.astype(np.float32), mask


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    buffer.tofile(str(path))


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
            _write_png(staging / split / "images" / f"{index:05d}.png", np.round(image * 255).astype(np.uint8))
            _write_png(staging / split / "masks" / f"{index:05d}.png", mask.astype(np.uint8) * 255)

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


def ensure_demo_dataset(root: str | Path = "datasets", n_trainval: int = 320, n_test: int = 80,
                        size: int = 256, seed: int = 0, name: str = "demo") -> Path:
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


# ---------------------------------------------------------------- sequences

SEQUENCE_SPEED = (0.2, 1.0)  # pixels per frame, drawn uniformly
SEQUENCE_FPS = 25.0
SEQUENCE_FILES = {"video": "sequence.avi", "frames": "frames", "masks": "masks", "truth": "truth.csv"}
_TRACK_ATTEMPTS = 200


@dataclass(frozen=True)
class Track:
    """One moving target of a sequence: at (x, y) in frame 0, moving (vx, vy) pixels per frame in a straight line.

    Its shape (drawn by ``_target_profile`` from a generator seeded with ``shape_seed``, the same in every frame)
    and its amplitude (peak above the background) are fixed; only its sub-pixel position changes.
    """

    id: int
    x: float
    y: float
    vx: float
    vy: float
    amplitude: float
    shape_seed: int

    def position(self, t: float) -> tuple[float, float]:
        """(x, y) in frame t, pixels (x the column, y the row)."""
        return self.x + self.vx * t, self.y + self.vy * t


@dataclass(frozen=True)
class FrameTruth:
    """What frame ``index`` holds: ``labels`` (H, W) int32, 0 on the background and k on the mask of target k
    (the support of its rendered profile, as in ``make_sample``); ``ids`` (n,) and ``centroids`` (n, 2), the
    (x, y) centre each target was rendered at, in pixels."""

    index: int
    time: float
    labels: np.ndarray
    ids: np.ndarray
    centroids: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0


def _patch(track: Track, t: int) -> tuple[np.ndarray, slice, slice]:
    """A target's rendered profile in frame t (peak 1, (2R+1)^2) and the rows and columns it covers."""
    x, y = track.position(t)
    cx, cy = int(np.rint(x)), int(np.rint(y))
    profile = _target_profile(np.random.default_rng(track.shape_seed), y - cy, x - cx)
    r = _PATCH_RADIUS
    return profile, slice(cy - r, cy + r + 1), slice(cx - r, cx + r + 1)


@dataclass(frozen=True)
class SyntheticSequence:
    """A seeded synthetic infrared sequence: a fixed background, fresh sensor noise in every frame, targets moving
    along straight lines. Frames are rendered on demand (``frame(t)``, or iterating), so memory does not grow
    with the length.

    Args:
        background: (H, W) float32, the noise-free scene as the sensor sees it (optics and fixed pattern applied).
        noise_sigma: standard deviation of the temporal noise added to every frame (0: none).
        tracks: the targets, ids 1..n.
        noise_seeds: one ``numpy.random.SeedSequence`` per frame, for its noise.
        fps: frames per second (frame t is at t / fps seconds).
    """

    background: np.ndarray
    noise_sigma: float
    tracks: tuple[Track, ...]
    noise_seeds: tuple[np.random.SeedSequence, ...]
    fps: float = SEQUENCE_FPS

    def __len__(self) -> int:
        return len(self.noise_seeds)

    @property
    def size(self) -> int:
        return self.background.shape[0]

    def frame(self, t: int) -> tuple[np.ndarray, FrameTruth]:
        """Frame t: (image (H, W) float32 in [0, 1] quantised to multiples of 1/255, its truth)."""
        if not 0 <= t < len(self):
            raise IndexError(f"frame {t} of a sequence of {len(self)} frames")
        image = self.background.copy()
        labels = np.zeros(image.shape, np.int32)
        for track in self.tracks:
            profile, rows, cols = _patch(track, t)
            image[rows, cols] += track.amplitude * profile
            labels[rows, cols][profile >= MASK_FRACTION] = track.id
        if self.noise_sigma > 0:
            image += np.random.default_rng(self.noise_seeds[t]).normal(0.0, self.noise_sigma, image.shape).astype(
                np.float32)
        image = (np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)
        truth = FrameTruth(index=t, time=t / self.fps, labels=labels,
                           ids=np.array([track.id for track in self.tracks], dtype=np.int64),
                           centroids=np.array([track.position(t) for track in self.tracks], dtype=np.float64
                                              ).reshape(-1, 2))
        return image, truth

    def __iter__(self):
        return (self.frame(t) for t in range(len(self)))


def _place_tracks(rng: np.random.Generator, background: np.ndarray, noise_sigma: float, count: int, n_frames: int,
                  speed: tuple[float, float]) -> list[Track]:
    """Up to ``count`` tracks whose targets stay inside the frame, never share a pixel of their (2R+1)^2 patches,
    keep their masks within 1..MAX_TARGET_AREA pixels and stay locally brighter (``MIN_RING_CONTRAST``) in every
    frame."""
    size_y, size_x = background.shape
    r = _PATCH_RADIUS
    frames = np.arange(n_frames)
    tracks: list[Track] = []
    centres: list[np.ndarray] = []  # per track, (n_frames, 2) integer (x, y) centres
    for _ in range(count):
        for _attempt in range(_TRACK_ATTEMPTS):
            pace, angle = rng.uniform(*speed), rng.uniform(0.0, 2.0 * math.pi)
            vx, vy = pace * math.cos(angle), pace * math.sin(angle)
            travel_x, travel_y = vx * (n_frames - 1), vy * (n_frames - 1)
            x_range = (r - min(travel_x, 0.0), size_x - 1 - r - max(travel_x, 0.0))  # every centre inside
            y_range = (r - min(travel_y, 0.0), size_y - 1 - r - max(travel_y, 0.0))
            if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
                continue
            x0, y0 = rng.uniform(*x_range), rng.uniform(*y_range)
            track = Track(id=len(tracks) + 1, x=x0, y=y0, vx=vx, vy=vy, amplitude=0.0,
                          shape_seed=int(rng.integers(2 ** 63)))
            path = np.rint(np.stack([x0 + vx * frames, y0 + vy * frames], axis=1)).astype(int)
            if any((np.abs(path - other).max(axis=1) <= 2 * r).any() for other in centres):
                continue  # the patches would touch in some frame
            patches = [_patch(track, t) for t in range(n_frames)]
            if not all(1 <= (profile >= MASK_FRACTION).sum() <= MAX_TARGET_AREA for profile, _, _ in patches):
                continue
            cx, cy = path[0]
            window = background[max(cy - 10, 0):cy + 11, max(cx - 10, 0):cx + 11]
            scr = math.exp(rng.uniform(*np.log(SCR_RANGE)))
            amplitude = max(scr * float(window.std()), 4.0 * noise_sigma, _MIN_AMPLITUDE)
            amplitude = min([amplitude] + [_HEADROOM - float(background[rows, cols][profile >= MASK_FRACTION].max())
                                           for profile, rows, cols in patches])
            if amplitude < _MIN_AMPLITUDE:
                continue  # no headroom somewhere along the path
            if any(_contrast(background[rows, cols] + amplitude * profile, profile >= MASK_FRACTION) < MIN_RING_CONTRAST
                   for profile, rows, cols in patches):
                continue
            tracks.append(Track(id=track.id, x=x0, y=y0, vx=vx, vy=vy, amplitude=amplitude,
                                shape_seed=track.shape_seed))
            centres.append(path)
            break
    return tracks


def _contrast(region: np.ndarray, support: np.ndarray) -> float:
    """Mean over the support minus mean over the ring around it."""
    return float(region[support].mean() - region[ring_around(support)].mean())


def make_sequence(seed: int | list[int], n_frames: int = 32, size: int = 128, targets: int | None = None,
                  speed: tuple[float, float] = SEQUENCE_SPEED, fps: float = SEQUENCE_FPS,
                  noise_sigma: float | None = None) -> SyntheticSequence:
    """A seeded synthetic image sequence with moving targets.

    The background is one ``make_sample`` scene (clutter, optics, fixed-pattern non-uniformity) that stays fixed;
    every frame adds its own temporal noise. Each target has a fixed shape and amplitude (drawn as in
    ``make_sample``, SCR in ``SCR_RANGE``) and moves in a straight line at ``speed`` pixels per frame (sub-pixel
    speeds by default), rendered at its sub-pixel position in every frame. Targets stay inside the frame and
    their (2R+1)^2 patches (R = ``_PATCH_RADIUS`` = 12) never meet, so each target is one 8-connected mask
    component in every frame, and each stays locally brighter than its surroundings.

    Args:
        seed: an int or a list of ints; the same seed gives the same sequence.
        n_frames: number of frames.
        size: side of the square frames in pixels (at least 64).
        targets: number of targets (1-3 drawn uniformly when None). A number that does not fit (long, fast
            sequences in small frames) raises ValueError.
        speed: (low, high) pixels per frame.
        fps: frames per second, for the frames' times.
        noise_sigma: the temporal noise; None draws it as ``make_sample`` does (0.003 to 0.015), 0 gives frames
            without temporal noise (then frame - background is exactly the quantised targets).
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels for a sequence, got {size}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if not 0 <= speed[0] <= speed[1]:
        raise ValueError(f"speed must be (low, high) pixels per frame with 0 <= low <= high, got {speed}")
    if targets is not None and not 1 <= targets <= 3:
        raise ValueError(f"targets must be 1, 2 or 3 (or None to draw it), got {targets}")
    if noise_sigma is not None and noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    scene_seed, *noise_seeds = np.random.SeedSequence(seed).spawn(n_frames + 1)
    rng = np.random.default_rng(scene_seed)
    scene = _scene(rng, size)
    scene = cv2.GaussianBlur(scene, (0, 0), sigmaX=rng.uniform(0.5, 1.0), borderType=cv2.BORDER_REFLECT)
    pattern, drawn_sigma = _fixed_pattern(rng, scene.shape)
    background = pattern.apply(scene).astype(np.float32)
    sigma = drawn_sigma if noise_sigma is None else float(noise_sigma)
    count = int(rng.integers(1, 4)) if targets is None else targets
    tracks = _place_tracks(rng, background, sigma, count, n_frames, speed)
    if not tracks or (targets is not None and len(tracks) < targets):
        raise ValueError(f"could only place {len(tracks)} of {count} target(s) moving at {speed} px/frame for "
                         f"{n_frames} frames in {size}x{size} frames; use larger frames, fewer frames or a lower speed")
    return SyntheticSequence(background=background, noise_sigma=sigma, tracks=tuple(tracks),
                             noise_seeds=tuple(noise_seeds), fps=float(fps))


@dataclass(frozen=True)
class SequenceFiles:
    """Where ``write_sequence`` put a sequence: the video, the folders of frames and masks, the truth table."""

    video: Path
    frames: Path
    masks: Path
    truth: Path


def write_sequence(sequence: SyntheticSequence, folder: str | Path, overwrite: bool = False) -> SequenceFiles:
    """Write a sequence as a video and as a folder of frames, with its masks and truth, one frame at a time.

    Layout (names in ``SEQUENCE_FILES``): ``<folder>/sequence.avi`` (lossless FFV1, so frames read back equal the
    generated ones), ``<folder>/frames/frame<t>.png`` (8-bit gray; t without leading zeros, so that reading them
    needs natural order), ``<folder>/masks/frame<t>.png`` (0/255) and ``<folder>/truth.csv`` (one row per target
    and frame: frame, time_s, id, x, y, area).

    Raises:
        FileExistsError: ``folder`` holds files and ``overwrite`` is False.
    """
    from utils.video import LOSSLESS_CODEC, FrameWriter, write_png   # here: utils.video imports nothing of this

    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} already holds files, which are kept; choose another folder or pass "
                              f"overwrite=True")
    files = SequenceFiles(video=folder / SEQUENCE_FILES["video"], frames=folder / SEQUENCE_FILES["frames"],
                          masks=folder / SEQUENCE_FILES["masks"], truth=folder / SEQUENCE_FILES["truth"])
    files.frames.mkdir(parents=True, exist_ok=True)
    files.masks.mkdir(parents=True, exist_ok=True)
    with FrameWriter(files.video, fps=sequence.fps, codec=LOSSLESS_CODEC, overwrite=overwrite) as video, \
            open(files.truth, "w", newline="", encoding="utf-8") as table:
        table.write("frame,time_s,id,x,y,area\n")
        for image, truth in sequence:
            pixels = np.round(image * 255.0).astype(np.uint8)
            video.write(pixels)
            write_png(files.frames / f"frame{truth.index}.png", pixels, overwrite=overwrite)
            write_png(files.masks / f"frame{truth.index}.png", truth.mask.astype(np.uint8) * 255, overwrite=overwrite)
            for target_id, (x, y) in zip(truth.ids, truth.centroids):
                area = int(np.count_nonzero(truth.labels == target_id))
                table.write(f"{truth.index},{truth.time:.6f},{target_id},{x:.3f},{y:.3f},{area}\n")
    return files
