"""From images to maps, without PyTorch: the geometry, batching and tiling around a network, and the maps' files.

The network takes (N, 1, H, W) with H and W multiples of 32. ``Geometry`` says how an image gets there and back:

- native mode (the default): reflect-pad the image at its bottom and right to the next multiple of 32, run,
  crop the outputs back to the image's own size;
- resize mode (``Geometry(resize=256)``, the release's): bilinear resize to 256x256, outputs stay 256x256.

An input larger than ``Geometry.tile`` on either side is run tile by tile (tiles overlapping by
``Geometry.overlap`` pixels, each output pixel taken from the tile it lies most centrally in), so memory stays
bounded whatever the frame size. Tiled and untiled outputs are not identical: the DBEM's bottleneck attention
(SOA) mixes all positions of its input and its dilated MDCR convolutions see about 600 px, so a tile never sees
all the context the whole frame gives.

The network is a PyTorch model prepared by ``utils.export.predict.prepare_model`` (run by
``utils.export.predict.run_network``, which loads torch) or an ``ArrayNetwork``, one that runs on numpy arrays
(``utils.export.onnx_runtime.OnnxRuntimeNet``). Nothing here imports torch, so that onnx_detect.py runs the same
geometry, batching and files as t_models.py where PyTorch is not installed::

    for prediction in iter_predictions(net, [("img1", image)], Geometry(resize=256)):
        prediction.T                                            # (256, 256) float32 logits
        write_prediction(prediction, "results/x")               # img/img1.png and mat/img1.mat
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from scipy.special import expit

from model.config import SIZE_MULTIPLE, StageOutput
from utils.io.images import pad_to_multiple, release_image, to_unit, write_png

MAPS_PER_STAGE = 3                 # B, T, D: the channel order of the map stacks below
MAX_PENDING_PIXELS = 1 << 25       # images waiting for a batch of their size, at most (~128 MB of float32)
RELEASE_SIZE = 256                 # the release trains, exports and scores at 256x256


@dataclass(frozen=True)
class Geometry:
    """How an image is brought to the network's input and back.

    Args:
        resize: None for native mode (pad to a multiple of 32, crop back); S for resize mode (bilinear to S x S,
            outputs at S x S; the release uses 256). S must be a multiple of 32.
        tile: side of the tiles, in pixels, a multiple of 32; an input larger than this on either side runs tile
            by tile. 0 never tiles.
        overlap: context shared by neighbouring tiles, in pixels: a multiple of 32 (so that every tile keeps the
            whole frame's pooling grid) smaller than ``tile``.
    """

    resize: int | None = None
    tile: int = 512
    overlap: int = 128

    def __post_init__(self) -> None:
        if self.resize is not None and (self.resize <= 0 or self.resize % SIZE_MULTIPLE):
            raise ValueError(f"resize must be a positive multiple of {SIZE_MULTIPLE} (the release uses 256), "
                             f"got {self.resize}")
        if self.tile < 0 or self.tile % SIZE_MULTIPLE:
            raise ValueError(f"tile must be 0 (no tiling) or a positive multiple of {SIZE_MULTIPLE}, got {self.tile}")
        if self.overlap < 0 or self.overlap % SIZE_MULTIPLE or (self.tile and self.overlap >= self.tile):
            raise ValueError(f"overlap must be a multiple of {SIZE_MULTIPLE} smaller than the tile "
                             f"({self.tile}), got {self.overlap}")

    def describe(self) -> str:
        if self.resize:                                   # tiles are for native sizes only
            return f"resized to {self.resize}x{self.resize}"
        tiles = f"tiles of {self.tile} px overlapping by {self.overlap}" if self.tile else "no tiling"
        return f"native size (reflect-padded to x32), {tiles}"


def training_size(info: dict) -> tuple[int, str]:
    """(the side the weights described by ``info`` were trained at, how that is known): a checkpoint of this
    project says it; a release best.pkl means 256 (the release trains and exports at 256x256)."""
    if info.get("kind") != "project":
        return RELEASE_SIZE, "a release best.pkl: the release trains and exports at 256x256"
    size = info.get("meta", {}).get("base_size") or (info.get("train_config") or {}).get("base_size")
    if size:
        return int(size), "the size this checkpoint was trained at"
    return RELEASE_SIZE, "this checkpoint does not say its training size; 256x256 is the release's"


def trained_geometry(info: dict, resize: int | None = None, native: bool = False,
                     tile: int = 512, overlap: int = 128) -> tuple[Geometry, str]:
    """The geometry to export with, and why, for weights described by ``info`` (from ``model.load_model``):
    resized to their training size (``training_size``), those trained at native scale (``run_0.py --geometry
    native``) included: on held-out frames they raised fewer false targets so than at each frame's own size, at
    no lower mIoU (docs/training.md); see ``chosen_geometry``."""
    return chosen_geometry(*training_size(info), resize, native, tile, overlap)


def chosen_geometry(trained: int, why: str, resize: int | None = None, native: bool = False,
                    tile: int = 512, overlap: int = 128) -> tuple[Geometry, str]:
    """By default ``trained`` x ``trained``, the size the weights were trained at (``why`` says how that is
    known); ``resize`` asks for another size, ``native`` for each image's own size (this project's: padded to a
    multiple of 32, tiled above ``tile`` px)."""
    if native:
        return (Geometry(None, tile, overlap),
                f"native size, padded to a multiple of {SIZE_MULTIPLE} (--native; this project's, not the release's)")
    if resize is not None and resize != trained:
        return (Geometry(resize, tile, overlap),
                f"resized to {resize}x{resize} (--resize; the weights were trained at {trained}x{trained})")
    return Geometry(trained, tile, overlap), f"resized to {trained}x{trained} as the release does ({why})"


@dataclass
class Prediction:
    """What the network made of one image, at the output size (native or resized), float32 (H, W) arrays.

    ``T`` are the last stage's target logits (sigmoid(T) > 0.5 is a target pixel), ``B`` its background and ``D``
    its reconstruction (None from a network that gives T alone: an ONNX graph exported with outputs T);
    ``stages`` holds every stage's ``StageOutput(B, T, D)`` when asked for, else is empty.
    """

    name: str
    T: np.ndarray
    B: np.ndarray | None = None
    D: np.ndarray | None = None
    stages: list[StageOutput] = field(default_factory=list)

    @property
    def probability(self) -> np.ndarray:
        """sigmoid(T), float32 (H, W)."""
        return sigmoid(self.T)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """sigmoid(T) as float32 (H, W)."""
    return expit(np.asarray(logits, dtype=np.float32))


def to_png(logits: np.ndarray) -> np.ndarray:
    """The 8-bit picture of a prediction: round(sigmoid(T) * 255), uint8 (H, W), computed in float64 so that
    values near a half grey level round the same way on every machine."""
    return np.rint(expit(np.asarray(logits, dtype=np.float64)) * 255.0).astype(np.uint8)


def write_prediction(prediction: Prediction, out_dir: str | Path) -> None:
    """The release's layout: img/<name>.png (round(sigmoid(T) * 255), 8-bit) and mat/<name>.mat (T logits, and B and
    D of the last stage when the network gives them, float32 (H, W)); the .mat whole or absent."""
    out_dir = Path(out_dir)
    write_png(out_dir / "img" / f"{prediction.name}.png", to_png(prediction.T), overwrite=True)  # checked before
    (out_dir / "mat").mkdir(parents=True, exist_ok=True)
    path = out_dir / "mat" / f"{prediction.name}.mat"
    tmp = path.with_name(f".{path.name}.tmp")          # whole or absent: resume counts a frame done by its .mat
    scipy.io.savemat(tmp, {name: np.asarray(getattr(prediction, name), dtype=np.float32) for name in ("T", "B", "D")
                           if getattr(prediction, name) is not None})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------

class ArrayNetwork(ABC):
    """A network that runs on numpy arrays, without PyTorch."""

    @abstractmethod
    def maps(self, batch: np.ndarray, return_stages: bool = False) -> np.ndarray:
        """The map stack of a batch (N, H, W) float32 of network inputs (H, W multiples of 32): (N, 3S, H, W)
        float32, B, T, D of every stage (S = K) with ``return_stages`` and of the last (S = 1) without; or
        (N, 1, H, W), T alone, from a network that gives only T."""


def maps_function(net) -> Callable[[np.ndarray, bool], np.ndarray]:
    """``net.maps`` for an ``ArrayNetwork``; for a prepared PyTorch model ``utils.export.predict.run_network``
    (torch loads then)."""
    if isinstance(net, ArrayNetwork):
        return net.maps
    from utils.export.predict import run_network
    return lambda batch, return_stages: run_network(net, batch, return_stages)


# ----------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------

def network_input(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The (H', W') float32 array the network runs on: resized as the release does, or padded to multiples of 32.

    ``image`` is a gray array as ``utils.io.images.read_image`` gives it (uint8 or uint16) or float32 in [0, 1].
    Resize mode is the release's geometry: an 8-bit image is resized as 8 bits (INTER_LINEAR), then / 255."""
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty grayscale image (H, W), got shape {image.shape}")
    if geometry.resize:
        return release_image(image, (geometry.resize, geometry.resize))
    return pad_to_multiple(to_unit(image))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles covering [0, length): stride tile - overlap, the last one flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tile_cuts(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """The part of [0, length) each tile supplies: neighbours split their overlap in the middle."""
    bounds = [0] + [(b + a + tile) // 2 for a, b in zip(starts[:-1], starts[1:])] + [length]
    return list(zip(bounds[:-1], bounds[1:]))


def needs_tiling(shape: tuple[int, int], geometry: Geometry) -> bool:
    return bool(geometry.tile) and max(shape) > geometry.tile


# ----------------------------------------------------------------------------------------------------------
# Running the network
# ----------------------------------------------------------------------------------------------------------

def run_tiled(net, x: np.ndarray, geometry: Geometry, batch_size: int = 1,
              return_stages: bool = False) -> np.ndarray:
    """The map stack (C, H, W) of one large input (H, W), computed tile by tile, ``batch_size`` tiles at a time."""
    maps_of = maps_function(net)
    h, w = x.shape
    th, tw = min(geometry.tile, h), min(geometry.tile, w)
    rows, cols = tile_starts(h, th, geometry.overlap), tile_starts(w, tw, geometry.overlap)
    row_cuts, col_cuts = tile_cuts(rows, th, h), tile_cuts(cols, tw, w)
    jobs = [(r, c, rc, cc) for r, rc in zip(rows, row_cuts) for c, cc in zip(cols, col_cuts)]
    out: np.ndarray | None = None
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        maps = maps_of(np.stack([x[r:r + th, c:c + tw] for r, c, _, _ in chunk]), return_stages)
        if out is None:
            out = np.empty((maps.shape[1], h, w), dtype=np.float32)
        for tile_maps, (r, c, (r0, r1), (c0, c1)) in zip(maps, chunk):
            out[:, r0:r1, c0:c1] = tile_maps[:, r0 - r:r1 - r, c0 - c:c1 - c]
    return out


def _prediction(name: str, image_shape: tuple[int, int], maps: np.ndarray, geometry: Geometry,
                keep_stages: bool) -> Prediction:
    """Crop a map stack (C, H', W') back to the image (native mode) and split it into stages (T alone: C = 1)."""
    if not geometry.resize:
        maps = maps[:, :image_shape[0], :image_shape[1]]
    if len(maps) == 1:
        return Prediction(name=name, T=np.ascontiguousarray(maps[0]))
    stages = [StageOutput(*(np.ascontiguousarray(m) for m in maps[i:i + MAPS_PER_STAGE]))
              for i in range(0, len(maps), MAPS_PER_STAGE)]
    last = stages[-1]
    return Prediction(name=name, T=last.T, B=last.B, D=last.D, stages=stages if keep_stages else [])


def iter_predictions(net, items: Iterable[tuple[str, np.ndarray]], geometry: Geometry = Geometry(),
                     batch_size: int = 1, return_stages: bool = False) -> Iterator[Prediction]:
    """Predictions for (name, image) pairs, images (H, W) of any sizes, as ``read_image`` gives them (uint8 or
    uint16) or float32 in [0, 1].

    Images whose network inputs have the same size are batched together (``batch_size`` at most; a prepared
    PyTorch model runs a batch ``model.sub_batch`` images per forward pass); a batch is run as soon as it is
    full, or when the waiting images exceed ``MAX_PENDING_PIXELS``. Predictions therefore come in completion
    order, not always in input order (in input order when batch_size is 1). ``net``: a prepared PyTorch model
    (``utils.export.predict.prepare_model``) or an ``ArrayNetwork``. With ``return_stages`` every stage's maps are
    kept (``Prediction.stages``; a one-stage model's single stage is B, T, D themselves).
    """
    assert batch_size >= 1, f"batch_size must be at least 1, got {batch_size}"
    maps_of = maps_function(net)
    pending: dict[tuple[int, int], list[tuple[str, tuple[int, int], np.ndarray]]] = {}  # by input size

    def flush(key: tuple[int, int]) -> Iterator[Prediction]:
        group = pending.pop(key)
        maps = maps_of(np.stack([x for _, _, x in group]), return_stages)   # (n, C, H', W')
        for (name, shape, _), image_maps in zip(group, maps):
            yield _prediction(name, shape, image_maps, geometry, return_stages)

    def pending_pixels() -> int:
        return sum(len(group) * h * w for (h, w), group in pending.items())

    for name, image in items:
        x = network_input(image, geometry)
        shape = np.shape(image)
        if needs_tiling(x.shape, geometry):
            maps = run_tiled(net, x, geometry, batch_size, return_stages)
            yield _prediction(name, shape, maps, geometry, return_stages)
            continue
        pending.setdefault(x.shape, []).append((name, shape, x))
        if len(pending[x.shape]) >= batch_size:
            yield from flush(x.shape)
        elif pending_pixels() > MAX_PENDING_PIXELS:
            yield from flush(max(pending, key=lambda k: len(pending[k]) * k[0] * k[1]))
    for key in list(pending):
        yield from flush(key)


def predict(net, image: np.ndarray, geometry: Geometry = Geometry(), return_stages: bool = False) -> Prediction:
    """The prediction for one image (H, W): uint8/uint16 as read from a file, or float32 in [0, 1]."""
    return next(iter_predictions(net, [("image", image)], geometry, 1, return_stages))
