"""Frames in: videos, folders of frames and single images, one frame at a time (constant memory).
Frames out are written by ``utils.io.frame_writer``.

Reading (``FrameSource``, ``iter_frames``): a source is

- a video file: anything ``cv2.VideoCapture`` opens (with opencv-python(-headless): FFmpeg, so .mp4, .avi,
  .mkv, .mov, ...). Each decoded frame (BGR uint8) becomes gray as ``cv2.cvtColor(frame, COLOR_BGR2GRAY)``
  does (ITU-R 601 luma), kept as 8 bits (H, W) like a still image from ``utils.io.images.read_image``, so that the
  release's geometry (8-bit resize, then / 255) applies to it as to an image file. A frame's time is its
  presentation time (``CAP_PROP_POS_MSEC`` / 1000) when the backend gives one, else index / fps; None when
  neither is known.
- a folder of frames: its image files (``utils.io.images.IMAGE_SUFFIXES``) in natural order (digits compare as
  numbers: frame2 before frame10; ties by plain name), each read by ``utils.io.images.read_image`` exactly as a
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
            probability, detections = detector(frame.image)          # utils.export.detections.Detector
            out.write(draw_detections(frame.image, detections), frame.name)
    print(source.summary)                                            # frames read, frames that failed, why
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from utils.io.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image

MAX_REPORTED_ERRORS = 5
MAX_CONSECUTIVE_FAILURES = 25  # reading a video stops after this many failed reads in a row


class VideoSourceError(ValueError):
    """A video, folder or image that cannot be opened as a source of frames at all."""


@dataclass
class Frame:
    """One frame: ``index`` (position in the source), ``time`` (seconds, or None), ``name`` (a file stem for
    outputs: the image's stem, or ``<video stem>_<index:06d>``), ``source`` (the video's or image's path) and
    ``image`` (gray (H, W) as ``utils.io.images.read_image`` gives it: uint8, uint16 for 16-bit data; ``to_unit``
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
                summary.add_failure(f"frame {index}: {error}" if self.fps else str(error))   # a sequence, or files
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
