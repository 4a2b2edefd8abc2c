"""Frames in, frames out: videos and folders of frames, one frame at a time (constant memory).

Reading (``FrameSource``, ``iter_frames``): a source is

- a video file: anything ``cv2.VideoCapture`` opens (with opencv-python(-headless): FFmpeg, so .mp4, .avi,
  .mkv, .mov, ...). Each decoded frame (BGR uint8) becomes gray as ``cv2.cvtColor(frame, COLOR_BGR2GRAY)``
  does (ITU-R 601 luma), kept as 8 bits (H, W) like a still image from ``utils.imageio.read_image``, so that the
  release's geometry (8-bit resize, then / 255) applies to it as to an image file. A frame's time is its
  presentation time (``CAP_PROP_POS_MSEC`` / 1000) when the backend gives one, else index / fps; None when
  neither is known.
- a folder of frames: its image files (``utils.imageio.IMAGE_SUFFIXES``) in natural order (digits compare as
  numbers: frame2 before frame10; ties by plain name), each read by ``utils.imageio.read_image`` exactly as a
  still image is. Time is index / fps when ``fps`` is given, else None.
- one image file: a source of one frame (time None).

The index of a frame is its position in the source; a frame that cannot be decoded keeps its index (later
frames are not renumbered), is counted in ``FrameSource.summary`` with its error (the first
``MAX_REPORTED_ERRORS``), and is skipped: bad frames are never fatal. A source that cannot be opened at all
raises ``VideoSourceError`` naming the path and saying what to do.

``FrameSource`` knows ``frame_count`` and ``fps`` before the first frame (a video's as its container announces
them, which may be an estimate; None when unknown), e.g. for a progress bar::

    source = FrameSource("flight.mp4")
    with FrameWriter("results/flight/annotated.avi", fps=source.fps or 25.0) as out:
        for frame in tqdm(source, total=source.frame_count, unit="frame"):
            probability, detections = detector(frame.image)          # utils.detections.Detector
            out.write(draw_detections(frame.image, detections), frame.name)
    print(source.summary)                                            # frames read, frames that failed, why

Writing (``FrameWriter``): a video file whose codec follows its suffix (``VIDEO_CODECS``: .avi MJPG, .mp4
mp4v, .mkv FFV1), or, for a path without a video suffix, a folder of PNG frames ``<name>.png``. Every codec
here is one that the FFmpeg inside opencv-python(-headless) writes without further libraries; .avi with MJPG
(each frame a JPEG, no inter-frame prediction) is the one any player opens, FFV1 is lossless.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from utils.imageio import IMAGE_SUFFIXES, ImageReadError, list_images, read_image, refuse_to_replace, write_png

VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}  # FourCC written for each suffix
LOSSLESS_CODEC = "FFV1"
MAX_REPORTED_ERRORS = 5
MAX_CONSECUTIVE_FAILURES = 25  # reading a video stops after this many failed reads in a row


class VideoSourceError(ValueError):
    """A video, folder or image that cannot be opened as a source of frames at all."""


@dataclass
class Frame:
    """One frame: ``index`` (position in the source), ``time`` (seconds, or None), ``name`` (a file stem for
    outputs: the image's stem, or ``<video stem>_<index:06d>``), ``source`` (the video's or image's path) and
    ``image`` (gray (H, W) as ``utils.imageio.read_image`` gives it: uint8, uint16 for 16-bit data; ``to_unit``
    makes it float32 in [0, 1])."""

    index: int
    time: float | None
    name: str
    source: str
    image: np.ndarray


@dataclass
class ReadSummary:
    """What reading a source gave: frames read, frames that could not be decoded, the first few errors."""

    read: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def add_failure(self, message: str, count: int = 1) -> None:
        self.failed += count
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(message)

    def __str__(self) -> str:
        text = f"{self.read} frame(s) read"
        if self.failed:
            text += f", {self.failed} could not be decoded and were skipped"
            text += "".join(f"\n  {error}" for error in self.errors)
            if self.failed > len(self.errors):
                text += f"\n  ... ({self.failed - len(self.errors)} more)"
        return text


def natural_key(name: str) -> tuple:
    """Sort key of natural order: runs of digits compare as numbers (frame2 < frame10), text ignoring case;
    names equal by that rule keep their plain order."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def list_frames(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder`` in natural order."""
    return sorted(list_images(folder), key=lambda p: natural_key(p.name))


def video_gray(frame: np.ndarray) -> np.ndarray:
    """A decoded video frame (BGR, BGRA or gray; 8 or 16 bit) as gray (H, W) of the same type."""
    if frame.ndim == 3 and frame.shape[2] == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    elif frame.ndim == 3 and frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
    elif frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    return frame


def _positive(value: float) -> float | None:
    return float(value) if math.isfinite(value) and value > 0 else None


class FrameSource:
    """The frames of a video file, a folder of frames or one image, read one at a time.

    Args:
        source: the path.
        fps: frames per second of a folder of frames (time = index / fps); for a video only used when its
            container gives no rate. None: times of folder frames are None.

    Iterating yields ``Frame`` records (each iteration reads the source again from its start) and fills
    ``summary`` (a fresh ``ReadSummary`` per iteration). ``kind`` is "video", "folder" or "image"; ``size`` is
    (H, W) when known before reading (a video's, an image's), else None.

    Raises:
        VideoSourceError: the path does not exist, is a folder without image files, or a file neither OpenCV's
            video reader nor ``read_image`` can open.
    """

    def __init__(self, source: str | Path, fps: float | None = None) -> None:
        self.path = Path(source)
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number of frames per second, got {fps}")
        self.summary = ReadSummary()
        if not self.path.exists():
            raise VideoSourceError(f"{self.path}: no such file or folder; give a video file, a folder of frames "
                                   f"or an image file")
        if self.path.is_dir():
            self.kind = "folder"
            self._files = list_frames(self.path)
            if not self._files:
                raise VideoSourceError(f"{self.path}: holds no image files ({', '.join(IMAGE_SUFFIXES)}) directly "
                                       f"inside it; a folder source is a folder of frames")
            self.frame_count: int | None = len(self._files)
            self.fps = fps
            self.size = None
            return
        if self.path.suffix.lower() in IMAGE_SUFFIXES:
            self.kind = "image"
            try:
                image = read_image(self.path)
            except ImageReadError as error:
                raise VideoSourceError(str(error)) from error
            self._still = Frame(index=0, time=None, name=self.path.stem, source=str(self.path), image=image)
            self.frame_count, self.fps, self.size = 1, None, image.shape
            return
        self.kind = "video"
        capture = self._open()
        try:
            count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
            self.frame_count = int(count) if math.isfinite(count) and count >= 1 else None
            self.fps = _positive(capture.get(cv2.CAP_PROP_FPS)) or fps
            width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            self.size = (height, width) if width > 0 and height > 0 else None
        finally:
            capture.release()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise VideoSourceError(
                f"{self.path}: OpenCV cannot open this file as a video (not a video, damaged, or a codec its FFmpeg "
                f"lacks). Check that it plays, convert it (e.g. ffmpeg -i {self.path.name} -c:v mjpeg out.avi), or "
                f"extract its frames into a folder of PNG files and give the folder")
        return capture

    def frames(self, summary: ReadSummary | None = None) -> Iterator[Frame]:
        """The frames from the start of the source; ``summary`` (a fresh one by default) becomes ``self.summary``
        and counts the frames read and the frames that failed as they come."""
        self.summary = summary = ReadSummary() if summary is None else summary
        if self.kind == "video":
            return self._video_frames(summary)
        if self.kind == "image":
            return iter([self._still])
        return self._folder_frames(summary)

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def _folder_frames(self, summary: ReadSummary) -> Iterator[Frame]:
        for index, path in enumerate(self._files):
            try:
                image = read_image(path)
            except ImageReadError as error:
                summary.add_failure(f"frame {index}: {error}")
                continue
            summary.read += 1
            time = index / self.fps if self.fps else None
            yield Frame(index=index, time=time, name=path.stem, source=str(path), image=image)

    def _video_frames(self, summary: ReadSummary) -> Iterator[Frame]:
        capture = self._open()
        index, failed_in_a_row = 0, 0   # index: the next frame's position in the video
        try:
            while True:   # past an announced count too: a container's count can be an estimate
                ok, decoded = capture.read()
                index += 1
                if not ok or decoded is None:
                    failed_in_a_row += 1
                    past_the_end = self.frame_count is not None and index >= self.frame_count
                    if past_the_end or failed_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                        break
                    continue
                if failed_in_a_row:   # frames the decoder could not give before this one
                    first = index - 1 - failed_in_a_row
                    summary.add_failure(f"frames {first}..{index - 2}: could not be decoded", failed_in_a_row)
                    failed_in_a_row = 0
                summary.read += 1
                yield Frame(index=index - 1, time=self._time(capture, index - 1),
                            name=f"{self.path.stem}_{index - 1:06d}", source=str(self.path), image=video_gray(decoded))
        finally:
            capture.release()
        # failed reads at the end are the end of the stream, unless the container announced more frames
        first_missing = index - failed_in_a_row
        if self.frame_count is not None and first_missing < self.frame_count:
            summary.add_failure(f"frames {first_missing}..{self.frame_count - 1}: announced by the container but "
                                f"could not be read (a truncated or damaged file?)", self.frame_count - first_missing)

    def _time(self, capture: cv2.VideoCapture, index: int) -> float | None:
        msec = capture.get(cv2.CAP_PROP_POS_MSEC)   # after read(): the presentation time of that frame
        if math.isfinite(msec) and (msec > 0 or (msec == 0 and index == 0)):
            return msec / 1000.0
        return index / self.fps if self.fps else None


def iter_frames(source: str | Path, fps: float | None = None, summary: ReadSummary | None = None) -> Iterator[Frame]:
    """The frames of a video, a folder of frames or an image, one at a time (see ``FrameSource``). When
    ``summary`` is given it counts the frames read and those that failed, with the first few errors."""
    yield from FrameSource(source, fps).frames(summary)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

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
