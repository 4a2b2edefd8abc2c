"""Targets, not maps: one record per detected target, masks and annotated frames, and a detector for notebooks.

A detection is an 8-connected component of ``probability > threshold``, where probability = sigmoid(T) is the
network's target probability. The components are those of ``utils.score.components`` (the labelling the scores use),
so ``detect(sigmoid(T), 0.5)`` finds exactly the predicted targets the standard protocol's Pd and Fa count
(sigmoid(T) > 0.5 in float32, which is T > 0 except for |T| below about 1e-7).

``detect`` takes the probability map, never logits: a map with values outside [0, 1] is refused with a message.
``detect_logits(T)`` (or ``detect(probability_from_logits(T))``) is the way from logits.

Usage::

    image = cv2.imread("frame.png", cv2.IMREAD_UNCHANGED)      # gray or colour, 8 or 16 bits, as stored
    probability, targets = Detector("best.pkl")(image)         # weights in, image (or its path) in
    targets = detect(probability, threshold=0.5)               # [Detection(id=1, x=.., y=.., ...)]
    annotated = draw_detections(image, targets)                # BGR uint8, for utils.io.video.FrameWriter

Coordinates are pixels of the map: x is the column, y the row, pixel (0, 0) the top-left pixel whose centre is
at (0, 0). A box (x0, y0, x1, y1) is inclusive-exclusive, as Python slices: the component lies in
``probability[y0:y1, x0:x1]``, x1 - x0 is its width. ``to_image_pixels`` takes detections found on a resized
map back to the image's pixels. Tables of detections are ``utils.export.detection_table``'s.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from utils.score.components import components
from utils.score.metrics import score_map
from utils.io.images import gray_as_read, read_image, write_png
from utils.io.frame_writer import to_bgr


@dataclass(frozen=True)
class Detection:
    """One detected target: an 8-connected component of probability > threshold.

    Args:
        id: 1..n in the order of ``utils.score.metrics.components`` (raster order of each component's first pixel).
        x, y: centroid in pixels, the mean of the component's column (x) and row (y) indices.
        x0, y0, x1, y1: bounding box, inclusive-exclusive: columns x0..x1-1, rows y0..y1-1.
        area: pixels in the component.
        peak, mean: the largest and the mean probability over the component's pixels.
        threshold: the probability threshold it was found with (pixels with probability > threshold).
    """

    id: int
    x: float
    y: float
    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak: float
    mean: float
    threshold: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive-exclusive."""
        return self.x0, self.y0, self.x1, self.y1

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y)."""
        return self.x, self.y


def probability_from_logits(logits: Any) -> np.ndarray:
    """sigmoid(T) as float32 (H, W), computed as the metrics compute it (``score_map(T, "sigmoid")``)."""
    return score_map(np.asarray(logits, dtype=np.float32), "sigmoid")


def _check_probability(probability: Any) -> np.ndarray:
    probability = np.asarray(probability, dtype=np.float32)
    if probability.ndim != 2:
        raise ValueError(f"detect: expected one probability map of shape (H, W), got shape {probability.shape}; "
                         f"pass one image's map (e.g. T[0, 0] of an (N, 1, H, W) batch, through sigmoid)")
    if probability.size and not np.isfinite(probability).all():
        raise ValueError("detect: the probability map holds NaN or inf values; check the model output")
    if probability.size and (probability.min() < 0.0 or probability.max() > 1.0):
        raise ValueError(f"detect: expected probabilities in [0, 1], got values in [{probability.min():.4g}, "
                         f"{probability.max():.4g}]; this looks like logits T: use detect_logits(T) or "
                         f"detect(probability_from_logits(T))")
    return probability


def detect(probability: Any, threshold: float = 0.5, min_area: int = 1) -> list[Detection]:
    """The targets of one probability map.

    Args:
        probability: sigmoid(T), (H, W), values in [0, 1] (numpy array or CPU tensor).
        threshold: a pixel belongs to a target when probability > threshold (strict); 0.5 is T > 0.
        min_area: drop components of fewer pixels (1 keeps all, as the metrics do); the ids of the kept ones
            are renumbered 1..m in the same order.

    Returns one ``Detection`` per 8-connected component, in label order; an empty list for an empty map.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"detect: threshold is a probability in [0, 1], got {threshold}")
    if min_area < 1:
        raise ValueError(f"detect: min_area must be at least 1 pixel, got {min_area}")
    probability = _check_probability(probability)
    found = components(probability > threshold)
    if found.n == 0:
        return []
    index = np.arange(1, found.n + 1)
    peaks = ndimage.maximum(probability, found.labels, index)
    means = ndimage.sum(probability.astype(np.float64), found.labels, index) / found.area
    boxes = ndimage.find_objects(found.labels)  # (rows slice, columns slice) per label
    detections = []
    for k in range(found.n):
        if found.area[k] < min_area:
            continue
        rows, cols = boxes[k]
        detections.append(Detection(id=len(detections) + 1,
                                    x=float(found.centroid[k, 1]), y=float(found.centroid[k, 0]),
                                    x0=int(cols.start), y0=int(rows.start), x1=int(cols.stop), y1=int(rows.stop),
                                    area=int(found.area[k]), peak=float(peaks[k]), mean=float(means[k]),
                                    threshold=float(threshold)))
    return detections


def detect_logits(logits: Any, threshold: float = 0.5, min_area: int = 1) -> list[Detection]:
    """``detect(sigmoid(T), threshold, min_area)`` for a map of logits T (H, W); the threshold is a probability."""
    return detect(probability_from_logits(logits), threshold, min_area)


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------

def mask_image(probability: Any, threshold: float = 0.5) -> np.ndarray:
    """The thresholded map as an 8-bit picture: 255 where probability > threshold, else 0, uint8 (H, W)."""
    return np.where(_check_probability(probability) > threshold, 255, 0).astype(np.uint8)


def write_mask(path: str | Path, probability: Any, threshold: float = 0.5, overwrite: bool = False) -> Path:
    """Write ``mask_image(probability, threshold)`` as a 0/255 PNG (the layout of the data sets' masks)."""
    return write_png(path, mask_image(probability, threshold), overwrite)


# ----------------------------------------------------------------------------------------------------------
# Annotated frames
# ----------------------------------------------------------------------------------------------------------

def detection_label(detection: Detection, show_score: bool = True) -> str:
    """The label drawn next to a detection: "#3: 0.97" (its id and peak probability), or "#3"."""
    return f"#{detection.id}: {detection.peak:.2f}" if show_score else f"#{detection.id}"


def draw_detections(image: np.ndarray, detections: Sequence[Detection], color: tuple[int, int, int] = (0, 255, 0),
                    scale: int = 1, show_score: bool = True) -> np.ndarray:
    """The frame with a box and a label per detection, as a new BGR uint8 image.

    Each box is drawn one pixel outside the component's bounding box (the target's own pixels stay visible);
    its label is the id and, with ``show_score``, the peak probability ("#3: 0.97"), above the box or, at the
    top edge, below it. ``scale`` enlarges the frame first (nearest neighbour; small infrared frames are
    hard to read at 1:1); the output is then ``scale`` times larger. ``color`` is BGR.
    """
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"draw_detections: scale must be a whole number >= 1, got {scale}")
    canvas = to_bgr(image)
    if scale > 1:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    height, width = canvas.shape[:2]
    font, font_scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1
    for d in detections:
        left, top = d.x0 * scale - 2, d.y0 * scale - 2          # one pixel of gap around the component
        right, bottom = d.x1 * scale + 1, d.y1 * scale + 1      # cv2.rectangle's corners are both inclusive
        cv2.rectangle(canvas, (left, top), (right, bottom), color, 1)
        label = detection_label(d, show_score)
        (text_w, text_h), baseline = cv2.getTextSize(label, font, font_scale, thickness)
        text_x = min(max(left, 0), max(width - text_w, 0))
        text_y = top - 2 if top - 2 - text_h >= 0 else min(bottom + 2 + text_h, height - baseline)
        cv2.putText(canvas, label, (text_x, text_y), font, font_scale, color, thickness, cv2.LINE_AA)
    return canvas


# ----------------------------------------------------------------------------------------------------------
# Weights in, image in, targets out
# ----------------------------------------------------------------------------------------------------------

class Detector:
    """A DCONet that returns targets: ``probability, detections = Detector("best.pkl")(image)``.

    Args:
        model: a weights file (a checkpoint of this project or a release ``best.pkl``, read by
            ``model.load_model``) or a model with DCONet's call signature (forward(x) -> (D, T)); None: the
            NUAA-SIRST model shipped in Weight/NUAA-SIRST/.
        device: "auto", "cpu", "cuda" or "cuda:N".
        geometry: ``utils.export.predict.Geometry``; default for a weights file: the geometry it was trained with, as
            t_models.py chooses it (a release best.pkl: 256x256); for a model: native size.
        threshold, min_area: as in ``detect``.
        bf16, plain: as in ``utils.export.predict.prepare_model`` (plain=True for a model that is not a DCONet).
        backend: "pytorch" (the deploy form) or "onnxruntime" (its ONNX graph, checked when made, run by ONNX
            Runtime on the CPU; ``utils.export.onnx_runtime``): the same detections up to float rounding.

    Calling it with an image (``DETECTOR_INPUT``: a path, a frame as cv2.IMREAD_UNCHANGED reads it, gray or
    colour, or a gray float image in [0, 1]) returns (sigmoid(T) as float32 (H, W), list of ``Detection``) in the
    image's pixels: the targets are found on the network's map, as t_models.py finds them, and when the geometry
    resized the image the map is resized back (bilinear) and the detections scaled back (``to_image_pixels``).
    A file gives what t_models.py gives for it; its pixels as read by OpenCV give the same (colour converted as
    the file's reading converts it, ``utils.io.images.gray_as_read``), but for PNGs whose colour conversion
    depends on a gamma chunk, up to 2 grey levels apart.
    """

    def __init__(self, model: Any = None, device: str = "auto", geometry: Any = None, threshold: float = 0.5,
                 min_area: int = 1, bf16: bool = False, plain: bool = False, backend: str = "pytorch") -> None:
        from model import load_model                      # here: torch loads only when a network is needed
        from utils.export.maps import RELEASE_SIZE, Geometry, trained_geometry
        from utils.export.onnx_runtime import prepare_backend
        from utils.export.writer import default_weights
        if model is None:
            model = default_weights(None)                 # the shipped NUAA-SIRST model
        if isinstance(model, (str, Path)):
            model, info = load_model(model)
            geometry = geometry if geometry is not None else trained_geometry(info)[0]
        self.geometry = Geometry() if geometry is None else geometry
        self.threshold = threshold
        self.min_area = min_area
        self.net = prepare_backend(model, backend, device, training_size=self.geometry.resize or RELEASE_SIZE,
                                   bf16=bf16, plain=plain)

    def __call__(self, image: np.ndarray | str | Path) -> tuple[np.ndarray, list[Detection]]:
        from utils.export.maps import predict
        from utils.io.images import resize_linear
        image = checked_image(image)
        probability = probability_from_logits(predict(self.net, image, self.geometry).T)
        found = to_image_pixels(detect(probability, self.threshold, self.min_area), probability.shape, image.shape)
        if probability.shape != image.shape:              # resize mode: back to the image's pixels
            probability = np.clip(resize_linear(probability, image.shape), 0.0, 1.0)
        return probability, found


DETECTOR_INPUT = ("an image file's path, or an image as cv2.imread(path, cv2.IMREAD_UNCHANGED) gives it (H, W), "
                  "(H, W, 3) BGR or (H, W, 4) BGRA, uint8 (0..255) or uint16 (0..65535), or a gray float image "
                  "(H, W) in [0, 1]")


def checked_image(image: Any) -> np.ndarray:
    """``image`` as the gray array the network takes if it is what ``Detector`` takes (``DETECTOR_INPUT``): a path
    read by ``read_image`` (as t_models.py reads it), a colour or alpha image converted by ``gray_as_read`` (as
    reading its file converts it); else a ValueError that says what was given, what is expected and how to
    convert it."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    image = np.asarray(image)
    given = f"got {image.dtype} {tuple(image.shape)}"
    if image.ndim == 3 and image.shape[2] in (1, 3, 4) and image.dtype in (np.uint8, np.uint16):
        image = gray_as_read(image)
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        raise ValueError(f"Detector expects {DETECTOR_INPUT}; {given}, a float colour image: pass it as read "
                         f"(uint8 or uint16), or convert it to gray, e.g. cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)")
    if image.ndim != 2:
        raise ValueError(f"Detector expects {DETECTOR_INPUT}; {given}: pass one image at a time, its single channel "
                         f"as (H, W) (e.g. image.squeeze())")
    if min(image.shape) < 1:
        raise ValueError(f"Detector expects {DETECTOR_INPUT}; {given}: the image is empty")
    if image.dtype in (np.uint8, np.uint16):
        return image
    if image.dtype.kind != "f":
        raise ValueError(f"Detector expects {DETECTOR_INPUT}; {given}: convert it, e.g. image.astype(np.uint8) for "
                         f"8-bit values, or to float in [0, 1] (image / image.max() for data in another range)")
    if not np.isfinite(image).all():
        raise ValueError(f"Detector expects {DETECTOR_INPUT}; {given} with NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        hint = (" (0..255 values: divide by 255, or pass them as uint8)" if high <= 255.0 and low >= 0.0 else
                " (0..65535 values: divide by 65535, or pass them as uint16)" if low >= 0.0 and high <= 65535.0
                else "")
        raise ValueError(f"Detector expects {DETECTOR_INPUT}; {given} with values in [{low:g}, {high:g}]: scale "
                         f"them to [0, 1]{hint}")
    return image


def to_image_pixels(detections: list[Detection], map_shape: tuple[int, int],
                    image_shape: tuple[int, int]) -> list[Detection]:
    """Detections found on a map of ``map_shape`` in the pixels of the image of ``image_shape`` it was resized
    from: centroids by pixel centres (x_image = (x + 0.5) * W / w - 0.5), boxes widened to whole pixels, areas
    scaled by the pixel ratio (rounded, at least 1)."""
    (h, w), (H, W) = map_shape, tuple(image_shape[:2])
    if (h, w) == (H, W):
        return list(detections)
    sy, sx = H / h, W / w
    return [replace(d, x=(d.x + 0.5) * sx - 0.5, y=(d.y + 0.5) * sy - 0.5, x0=int(math.floor(d.x0 * sx)),
                    y0=int(math.floor(d.y0 * sy)), x1=min(W, int(math.ceil(d.x1 * sx))),
                    y1=min(H, int(math.ceil(d.y1 * sy))), area=max(1, round(d.area * sx * sy))) for d in detections]
