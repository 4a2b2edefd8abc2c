"""utils/video.py: frames from videos and folders, one at a time, and annotated output."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from utils.export.detections import detect, draw_detections
from utils.io.images import read_image, write_png
from utils.io.frame_writer import VIDEO_CODECS, FrameWriter
from utils.io.video import FrameSource, ReadSummary, VideoSourceError, iter_frames, list_frames


def gray_frames(count: int, shape=(48, 64), seed: int = 0) -> list[np.ndarray]:
    """Random 8-bit gray frames, each with a bright square whose position depends on the frame."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        frame = rng.integers(0, 120, shape, dtype=np.uint8)
        frame[10:20, 2 * i:2 * i + 10] = 250
        frames.append(frame)
    return frames


def test_folder_frames_in_natural_order(tmp_path):
    for name in ("frame10.png", "frame2.png", "Frame3.png", "frame1.png", "notes.txt", "frame02.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_frames(tmp_path)] == ["frame1.png", "frame02.png", "frame2.png", "Frame3.png",
                                                       "frame10.png"]


def test_folder_source_times_and_a_corrupt_frame(tmp_path):
    frames = gray_frames(12)
    for i, frame in enumerate(frames):
        write_png(tmp_path / f"f{i}.png", frame)
    (tmp_path / "f5.png").write_bytes(b"not a png")                      # a damaged frame in the middle
    source = FrameSource(tmp_path, fps=4.0)
    assert source.kind == "folder" and source.frame_count == 12 and source.fps == 4.0
    got = list(source)
    assert [f.index for f in got] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11], "later frames keep their index"
    assert [f.time for f in got] == [i / 4.0 for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11)]
    assert [f.name for f in got][:3] == ["f0", "f1", "f2"]
    for frame in got:
        np.testing.assert_array_equal(frame.image, read_image(tmp_path / f"f{frame.index}.png"))
    assert source.summary.read == 11 and source.summary.failed == 1
    assert "f5.png" in source.summary.errors[0] and "frame 5" in source.summary.errors[0]
    assert "1 could not be decoded" in str(source.summary)
    assert "data set" not in source.summary.errors[0]
    plain = FrameSource(tmp_path)                                        # a folder of images, not a sequence
    list(plain)
    assert plain.summary.errors[0].startswith(f"{tmp_path / 'f5.png'}: not a readable image")
    summary = ReadSummary()
    assert all(f.time is None for f in iter_frames(tmp_path, summary=summary)), "no fps: no times"
    assert (summary.read, summary.failed) == (11, 1)


def test_lossless_video_round_trip(tmp_path):
    frames = gray_frames(9)
    path = tmp_path / "clip.mkv"
    with FrameWriter(path, fps=7.5) as out:
        for frame in frames:
            out.write(frame)
    source = FrameSource(path)
    assert (source.kind, source.frame_count, source.fps, source.size) == ("video", 9, pytest.approx(7.5), (48, 64))
    got = list(source)
    assert [f.index for f in got] == list(range(9)) and got[3].name == "clip_000003"
    for frame, written in zip(got, frames):
        assert frame.image.dtype == np.uint8 and frame.image.shape == (48, 64)
        np.testing.assert_array_equal(frame.image, written)                      # FFV1 is lossless
        assert frame.time == pytest.approx(frame.index / 7.5, abs=1e-3)         # .mkv stores milliseconds
    assert source.summary.read == 9 and source.summary.failed == 0
    assert len(list(source)) == 9, "a source can be read again"


@pytest.mark.parametrize("suffix", sorted(VIDEO_CODECS))
def test_annotated_video_is_readable_with_every_codec(tmp_path, suffix):
    frames = gray_frames(6)
    path = tmp_path / f"annotated{suffix}"
    with FrameWriter(path, fps=10.0) as out:
        for frame in frames:
            found = detect((frame > 200).astype(np.float32))
            out.write(draw_detections(frame, found, color=(0, 0, 255)))
    got = list(FrameSource(path))
    assert len(got) == 6 and got[0].image.shape == (48, 64)
    for frame, written in zip(got, frames):   # lossy codecs: close to the drawn frame's gray
        drawn = cv2.cvtColor(draw_detections(written, detect((written > 200).astype(np.float32)), color=(0, 0, 255)),
                             cv2.COLOR_BGR2GRAY)
        assert np.abs(frame.image.astype(float) - drawn).mean() < 12


def test_frame_writer_folder_and_refusals(tmp_path):
    with FrameWriter(tmp_path / "out") as out:
        out.write(np.zeros((8, 8), np.float32), "a")
        out.write(np.full((8, 8, 3), 255, np.uint8))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000001.png", "a.png"]
    assert cv2.imread(str(tmp_path / "out" / "000001.png")).min() == 255
    with pytest.raises(FileExistsError, match="out"):
        FrameWriter(tmp_path / "out")
    FrameWriter(tmp_path / "out", overwrite=True).write(np.ones((8, 8), np.float32), "a")
    assert cv2.imread(str(tmp_path / "out" / "a.png")).min() == 255

    video = tmp_path / "v.avi"
    with FrameWriter(video) as out:
        out.write(np.zeros((16, 16), np.uint8))
        with pytest.raises(ValueError, match="share a size"):
            out.write(np.zeros((16, 32), np.uint8))
    with pytest.raises(FileExistsError, match="v.avi"):
        FrameWriter(video)


def test_truncated_video_counts_the_frames_it_lost(tmp_path):
    path = tmp_path / "full.avi"
    with FrameWriter(path, fps=10.0) as out:                               # MJPG
        for frame in gray_frames(20):
            out.write(frame)
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    source = FrameSource(cut)
    assert source.frame_count == 20                                        # as the AVI header announces
    got = list(source)
    assert 0 < len(got) < 20 and [f.index for f in got] == list(range(len(got)))
    assert source.summary.read == len(got) and source.summary.read + source.summary.failed == 20
    assert "could not be read" in str(source.summary)


class ScriptedCapture:
    """A stand-in for cv2.VideoCapture whose frames decode or fail as the script says (True: decodes), and whose
    container announces ``announced`` frames (0: no count)."""

    def __init__(self, script: list[bool], announced: int):
        self.script, self.announced, self.position, self.msec = script, announced, 0, 0.0

    def isOpened(self):
        return True

    def get(self, prop):
        return {cv2.CAP_PROP_FRAME_COUNT: float(self.announced), cv2.CAP_PROP_FPS: 20.0, cv2.CAP_PROP_FRAME_WIDTH: 4,
                cv2.CAP_PROP_FRAME_HEIGHT: 2, cv2.CAP_PROP_POS_MSEC: self.msec}[prop]

    def read(self):
        index, self.position = self.position, self.position + 1
        if index >= len(self.script) or not self.script[index]:
            return False, None
        self.msec = index * 50.0
        return True, np.full((2, 4, 3), index, np.uint8)

    def release(self):
        pass


@pytest.mark.parametrize("announced, read, failed", [(6, 3, 3), (0, 3, 2), (4, 3, 2)])
def test_undecodable_video_frames_are_counted_and_skipped(tmp_path, monkeypatch, announced, read, failed):
    """Frames 1, 2 and 5 fail. A failure at the end is a lost frame when the container announced it, the end of
    the stream when it announced no count; a count that is too low does not cut the video short."""
    path = tmp_path / "scripted.mp4"
    path.write_bytes(b"")
    script = [True, False, False, True, True, False]
    monkeypatch.setattr(FrameSource, "_open", lambda self: ScriptedCapture(script, announced))
    source = FrameSource(path)
    assert source.frame_count == (announced or None) and source.fps == 20.0
    got = list(source)
    assert [f.index for f in got] == [0, 3, 4]
    assert [f.time for f in got] == [0.0, 0.15, 0.2]
    assert [f.image[0, 0] for f in got] == [0, 3, 4]
    assert source.summary.errors[0].startswith("frames 1..2")
    assert (source.summary.read, source.summary.failed) == (read, failed)


def test_sources_that_cannot_be_opened(tmp_path):
    with pytest.raises(VideoSourceError, match="missing.mp4: no such file"):
        FrameSource(tmp_path / "missing.mp4")
    notes = tmp_path / "notes.avi"
    notes.write_text("these are notes, not a video\n")
    with pytest.raises(VideoSourceError, match="notes.avi: OpenCV cannot open this file as a video.*folder of PNG"):
        FrameSource(notes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoSourceError, match="empty: holds no image files"):
        FrameSource(tmp_path / "empty")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(VideoSourceError, match="broken.png: not a readable image"):
        FrameSource(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="fps"):
        FrameSource(tmp_path, fps=0.0)
    write_png(tmp_path / "still.png", np.full((5, 6), 128, np.uint8))
    (frame,) = list(FrameSource(tmp_path / "still.png"))
    assert (frame.index, frame.time, frame.name, frame.image.shape) == (0, None, "still", (5, 6))
