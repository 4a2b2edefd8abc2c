"""The background of a synthetic infrared frame: sky, clouds, horizon, sea or trees, buildings (``render_scene``)
and the sensor that sees it (``fixed_pattern``, ``sensor``). ``utils.data.synthetic`` adds the targets."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


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

def render_scene(rng: np.random.Generator, size: int) -> np.ndarray:
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


def fixed_pattern(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[_FixedPattern, float]:
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


def sensor(rng: np.random.Generator, scene: np.ndarray) -> tuple[np.ndarray, float]:
    """Apply fixed-pattern non-uniformity and temporal noise. Returns (background, temporal noise sigma)."""
    pattern, noise_sigma = fixed_pattern(rng, scene.shape)
    noise = rng.normal(0.0, noise_sigma, scene.shape).astype(np.float32)
    background = pattern.apply(scene) + noise
    return background.astype(np.float32), noise_sigma
