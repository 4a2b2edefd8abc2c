"""Frames out, one at a time (``FrameWriter``): a video file whose codec follows its suffix (``VIDEO_CODECS``:
.avi MJPG, .mp4 mp4v, .mkv FFV1), or, for a path without a video suffix, a folder of PNG frames ``<name>.png``. Every codec
here is one that the FFmpeg inside opencv-python(-headless) writes without further libraries; .avi with MJPG
(each frame a JPEG, no inter-frame prediction) is the one any player opens, FFV1 is lossless.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from utils.io.images import refuse_to_replace, write_png

VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}  # FourCC written for each suffix
LOSSLESS_CODEC = "FFV1"


def to_bgr(image: np.ndarray) -> np.ndarray:
    """A frame as a BGR uint8 picture (a new array): float gray in [0, 1] is scaled by 255 (clipped, rounded),
    16-bit gray keeps its 8 high bits, uint8 gray is repeated over three channels, BGR uint8 is copied."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image.copy()
    if image.ndim != 2:
        raise ValueError(f"expected a gray frame (H, W) or a BGR uint8 frame (H, W, 3), got shape {image.shape} "
                         f"and type {image.dtype}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


class FrameWriter:
    """Annotated output, one frame at a time: a video file or a folder of PNG frames.

    Args:
        path: a file ending in a suffix of ``VIDEO_CODECS`` (.avi, .mp4, .mkv) for a video, anything else for a
            folder of PNG frames.
        fps: frames per second of a video (ignored for a folder).
        codec: a FourCC to use instead of the suffix's (e.g. "FFV1" for lossless .avi).
        overwrite: replace an existing video, or write into a folder that already holds files (files of the
            same names are replaced, others kept); without it both are errors that name the path.

    ``write(image, name)`` takes gray (float in [0, 1] or uint8) or BGR uint8 frames; a video's frames must all
    have the first frame's size. ``name`` names a PNG frame (default: the frame's number, ``000000.png``, ...).
    Use as a context manager, or call ``close()``: a video is only complete once closed.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, codec: str | None = None, overwrite: bool = False) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        self.kind = "video" if suffix in VIDEO_CODECS else "folder"
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number of frames per second, got {fps}")
        if codec is not None and len(codec) != 4:
            raise ValueError(f"codec must be a four-character code (FourCC) such as MJPG, got {codec!r}")
        self.fps = float(fps)
        self.codec = codec or VIDEO_CODECS.get(suffix)
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        if self.kind == "video":
            if self.path.is_dir():
                raise FileExistsError(f"{self.path} is a folder; give a video file name ending in "
                                      f"{', '.join(VIDEO_CODECS)}")
            refuse_to_replace(self.path, overwrite)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            if self.path.is_file():
                raise FileExistsError(f"{self.path} is a file; annotated frames go to a folder, or to a video "
                                      f"file ending in {', '.join(VIDEO_CODECS)}")
            if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
                raise FileExistsError(f"{self.path} already holds files, which are kept; choose another folder, "
                                      f"empty it, or pass overwrite=True (--overwrite)")
            self.path.mkdir(parents=True, exist_ok=True)
        self._overwrite = overwrite

    def write(self, image: np.ndarray, name: str | None = None) -> None:
        """Append one frame (gray float in [0, 1], gray uint8, or BGR uint8)."""
        frame = to_bgr(image)
        if self.kind == "folder":
            stem = name if name is not None else f"{self.frames:06d}"
            write_png(self.path / f"{stem}.png", frame, overwrite=self._overwrite)
            self.frames += 1
            return
        size = frame.shape[:2]
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), self.fps,
                                           (size[1], size[0]), True)
            if not self._writer.isOpened():
                self._writer.release()
                self._writer = None
                raise OSError(f"{self.path}: OpenCV cannot write {self.codec} video here; use another suffix "
                              f"({', '.join(f'{s} {c}' for s, c in VIDEO_CODECS.items())}) or a folder of PNG frames")
            self._size = size
        elif size != self._size:
            raise ValueError(f"{self.path}: frame {self.frames} is {size[1]}x{size[0]} but the video is "
                             f"{self._size[1]}x{self._size[0]}; the frames of one video must share a size "
                             f"(write to a folder of PNG frames instead)")
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        """Finish the video (a no-op for a folder, or when called again)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            if not self.path.is_file() or self.path.stat().st_size == 0:
                raise OSError(f"{self.path}: the video writer finished without writing the file")

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
