"""Checkpoint files: this project's format (written atomically, migrated from older versions) and reading either
it or the authors' best.pkl (converted by ``model.release``).

Every file is read with ``torch.load(..., weights_only=True)``: a pickle that needs more than tensors and plain
containers is refused, because unpickling it could run arbitrary code.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import DCONetConfig
from .dconet import DCONet, unwrap
from .release import CheckpointError, check_fit, strip_module_prefix, from_release_state_dict

FORMAT_NAME = "dconet"
FORMAT_VERSION = 2   # 2: the BSGU's four gate convolutions as four modules (format 1 held them as one)


EXPECTED = "expected a checkpoint written by run_0.py or an authors' best.pkl (torch.save of DCONet's state_dict)"

# The first bytes of files that are often given as weights by mistake, and what they are.
_NOT_WEIGHTS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"BM", "a BMP image"),
                (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"GIF8", "a GIF image"),
                (b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 file (Keras or MATLAB 7.3)"),
                (b"MATLAB", "a MATLAB .mat file"), (b"\x1aE\xdf\xa3", "a video (Matroska/WebM)"),
                (b"RIFF", "a RIFF file (an AVI video or a WAV sound)"))


def _what_it_is(head: bytes) -> str | None:
    """What a file that starts with ``head`` is, when that is plainly not a PyTorch file (None otherwise)."""
    for magic, kind in _NOT_WEIGHTS:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video"
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if text.lstrip().startswith(("{", "[")):
            return "a text file in JSON (a run's config.json, perhaps)"
        return "a text file"
    return None


def read_weights_file(path: str | Path, map_location: str | torch.device = "cpu"):
    """torch.load(path, weights_only=True), with errors that name the file, say what it is and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), as an interrupted download or copy leaves it; "
                              f"{EXPECTED}: fetch or copy it again")
    kind = _what_it_is(head)
    if kind is not None:
        raise CheckpointError(f"{path}: this is {kind}, not a PyTorch weights file; {EXPECTED}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise CheckpointError(f"{path}: a pickle that torch.save did not write (pickle.dump of something "
                                  f"else?), not a PyTorch weights file; {EXPECTED}") from None
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise CheckpointError(
            f"{path}: refused. The file holds Python objects beyond tensors and plain containers "
            f"({found[1] if found else 'a class'}), and unpickling them could run arbitrary code. If you trust its "
            f"origin, load it once in a separate script, save only its state_dict (torch.save(obj.state_dict(), "
            f"...)) and pass that file instead") from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as error:
        what = "PyTorch zip archive" if head.startswith(b"PK\x03\x04") else "PyTorch file"
        raise CheckpointError(f"{path}: a {what} that is truncated or damaged ({type(error).__name__}: "
                              f"{str(error).split('. ')[0][:100] or 'unreadable'}); {EXPECTED}: fetch or "
                              f"copy it again") from None


def save_checkpoint(path: str | Path, model: DCONet, meta: dict | None = None, **extra) -> Path:
    """Write this project's checkpoint format atomically (temp file in the same folder, then rename).

    The file holds {"format", "format_version", "config", "model", "meta"} plus any ``extra`` entries (a
    training run adds its optimizer, schedule and RNG states). It loads with weights_only=True.
    """
    path = Path(path)
    model = unwrap(model)
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta or {})}
    payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint of this project's format (the whole dict: config, model, meta, training state)."""
    payload = read_weights_file(path, map_location)
    if not _is_project_payload(payload):
        raise CheckpointError(f"{path}: not a checkpoint of this project's format (no 'format': "
                              f"'{FORMAT_NAME}' entry); for an authors' best.pkl use load_model()")
    return _in_current_format(payload, path)


def _is_project_payload(payload) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT_NAME


def _in_current_format(payload: dict, path) -> dict:
    """The payload with its weights (and any optimizer state in it) in this version's layout."""
    version = payload.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version of this project (format "
                              f"{payload['format_version']}, this code reads up to {FORMAT_VERSION}); update the code")
    if version < 2:
        payload = _from_format_1(payload)
    return payload


# Format 1 held the BSGU's four gate convolutions as one, "bsgu.gates", their weights and biases stacked in
# this order along the output channels.
_FORMAT_1_GATES = ("conv_f", "conv_i", "conv_o", "conv_g")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _format_2_keys(key: str) -> list[str]:
    """The keys that a format-1 state_dict key became in format 2 (one, or four for a fused gate tensor)."""
    m = re.match(r"(.*bsgu\.)gates\.(weight|bias)$", key)
    return [f"{m[1]}{gate}.{m[2]}" for gate in _FORMAT_1_GATES] if m else [key]


def _split(value, parts: int):
    """A tensor of a fused gate parameter cut into its ``parts`` blocks; anything else repeated."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and parts > 1:
        return [block.clone() for block in value.chunk(parts)]
    return [value] * parts


def _from_format_1(payload: dict) -> dict:
    """Format 1 -> 2: the fused gate parameters split into the four gate convolutions, in the weights and in every
    optimizer state_dict found in the payload (its per-parameter state is indexed by parameter position)."""
    model = payload["model"]
    blocks = {new: block for key, tensor in model.items()
              for new, block in zip(_format_2_keys(key), _split(tensor, len(_format_2_keys(key))))}
    order = []                                      # the keys in the order of a format-2 state_dict
    for key in model:
        m = re.match(r"(.*bsgu\.)gates\.(weight|bias)$", key)
        if m is None:
            order.append(key)
        elif m[2] == "weight":                      # each gate's weight and bias together, gate by gate
            order += [f"{m[1]}{gate}.{field}" for gate in _FORMAT_1_GATES for field in ("weight", "bias")]
    index = {key: i for i, key in enumerate(k for k in order if not k.endswith(_BUFFERS))}   # parameter positions
    params = [key for key in model if not key.endswith(_BUFFERS)]        # format 1's order of model.parameters()
    positions = [[index[new] for new in _format_2_keys(key)] for key in params]

    def optimizer(state: dict) -> dict:
        per_param = {}
        for old, entry in state["state"].items():
            new = positions[int(old)]
            values = {name: _split(value, len(new)) for name, value in entry.items()}
            per_param.update({p: {name: v[j] for name, v in values.items()} for j, p in enumerate(new)})
        groups = [{**group, "params": sorted(p for old in group["params"] for p in positions[old])}
                  for group in state["param_groups"]]                   # listed in the order of the parameters
        return {**state, "state": per_param, "param_groups": groups}

    def convert(value):
        if isinstance(value, dict):
            if {"state", "param_groups"} <= set(value) and \
                    sum(len(g["params"]) for g in value["param_groups"]) == len(params):
                return optimizer(value)
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        return value

    upgraded = {key: convert(value) for key, value in payload.items() if key != "model"}
    return {**upgraded, "model": {key: blocks[key] for key in order}, "format_version": 2}


def model_from_payload(payload: dict, source: str) -> DCONet:
    """Build the model that a project checkpoint describes and load its weights."""
    model = DCONet(DCONetConfig.from_dict(payload["config"]))
    state = strip_module_prefix(payload["model"])
    check_fit({k: v.shape for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict(state, strict=True)
    return model


def _moving_average(payload: dict) -> dict | None:
    """The weights that a run's validation scored, where they are not the file's "model": a latest.pkl of a run
    with ``--ema`` holds the trained weights there (to resume) and the moving average, which validation and
    best.pkl use, in its training state (``module.<name>``, BatchNorm statistics included). None otherwise."""
    average = (payload.get("train_state") or {}).get("ema")
    if not average:
        return None
    return {key[len("module."):]: value for key, value in average.items() if key.startswith("module.")}


def _describe(payload) -> str:
    """A few words on what a loaded payload that is not DCONet's holds."""
    if isinstance(payload, Mapping) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        keys = sorted(map(str, payload))
        return f"holds the state_dict of another network ({len(keys)} tensors, keys {', '.join(keys[:4])}, ...)"
    if isinstance(payload, Mapping):
        return f"holds a dict with keys {sorted(map(str, payload))[:6]}"
    return f"holds a {type(payload).__name__}"


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DCONet, dict]:
    """Load a DCONet from either this project's checkpoint or a release best.pkl (detected, K inferred).

    Returns (model, info) with info = {"kind": "project" | "release", "config": ..., "meta": ..., "weights": ...};
    a project checkpoint written by training adds "train_config" (the run's settings). "weights" is "moving
    average" for a latest.pkl of a run with ``--ema`` (loaded as that average, the weights its validation scored
    and best.pkl holds; resuming reads the trained weights with ``load_checkpoint``), else "as saved".
    The model is on the CPU (or ``map_location``) in eval mode.
    """
    payload = read_weights_file(path, map_location)
    source = str(path)
    if _is_project_payload(payload):
        payload = _in_current_format(payload, path)
        average = _moving_average(payload)
        if average is not None:
            payload = {**payload, "model": average}
        model = model_from_payload(payload, source)
        info = {"kind": "project", "meta": payload.get("meta", {}),
                "train_config": payload.get("train_config") or payload.get("train_state", {}).get("config"),
                "weights": "moving average" if average is not None else "as saved"}
    else:
        state = payload
        if isinstance(payload, dict) and isinstance(payload.get("state_dict"), Mapping):
            state = payload["state_dict"]
        if not (isinstance(state, Mapping) and any(re.match(r"(module\.)?decos\.\d+\.", str(k)) for k in state)):
            raise CheckpointError(f"{path}: {_describe(state)}, not DCONet's; {EXPECTED}")
        model = from_release_state_dict(state, source)
        info = {"kind": "release", "meta": {}, "weights": "as saved"}
    info["config"] = model.config.to_dict()
    return model.eval(), info
