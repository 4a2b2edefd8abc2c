"""Seeded synthetic infrared image sequences with moving targets and their per-frame truth.

Sequences (``make_sequence``, ``write_sequence``) reuse these steps for video: one scene with its optics and
fixed pattern as a fixed background, fresh temporal noise in every frame, and 1 to 3 targets of fixed shape and
amplitude moving along straight lines at sub-pixel speeds, each rendered at its sub-pixel position in every
frame. Their truth is per frame: a label map of the targets' masks and each target's id and (x, y) centre.

    sequence = make_sequence(seed=7, n_frames=32, size=128, targets=2)
    for image, truth in sequence:           # float32 (H, W) in [0, 1]; FrameTruth: label map, ids, (x, y) centres
        ...
    files = write_sequence(sequence, "data/seq7")   # sequence.avi (lossless), frames/, masks/, truth.csv
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.data.synthetic import (HEADROOM, MASK_FRACTION, MAX_TARGET_AREA, MIN_AMPLITUDE, MIN_RING_CONTRAST,
                                  PATCH_RADIUS, SCR_RANGE, ring_around, target_profile)
from utils.data.synthetic_scene import fixed_pattern, render_scene


SEQUENCE_SPEED = (0.2, 1.0)  # pixels per frame, drawn uniformly
SEQUENCE_FPS = 25.0
SEQUENCE_FILES = {"video": "sequence.avi", "frames": "frames", "masks": "masks", "truth": "truth.csv"}
_TRACK_ATTEMPTS = 200


@dataclass(frozen=True)
class Track:
    """One moving target of a sequence: at (x, y) in frame 0, moving (vx, vy) pixels per frame in a straight line.

    Its shape (drawn by ``target_profile`` from a generator seeded with ``shape_seed``, the same in every frame)
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
    profile = target_profile(np.random.default_rng(track.shape_seed), y - cy, x - cx)
    r = PATCH_RADIUS
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
    r = PATCH_RADIUS
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
            amplitude = max(scr * float(window.std()), 4.0 * noise_sigma, MIN_AMPLITUDE)
            amplitude = min([amplitude] + [HEADROOM - float(background[rows, cols][profile >= MASK_FRACTION].max())
                                           for profile, rows, cols in patches])
            if amplitude < MIN_AMPLITUDE:
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
    their (2R+1)^2 patches (R = ``PATCH_RADIUS`` = 12) never meet, so each target is one 8-connected mask
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
    scene = render_scene(rng, size)
    scene = cv2.GaussianBlur(scene, (0, 0), sigmaX=rng.uniform(0.5, 1.0), borderType=cv2.BORDER_REFLECT)
    pattern, drawn_sigma = fixed_pattern(rng, scene.shape)
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
    from utils.io.images import write_png
    from utils.io.frame_writer import LOSSLESS_CODEC, FrameWriter   # here: only a video needs it

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
