"""Checkpoints: the authors' release layout (best.pkl) and this project's own format.

This module is the one place that knows the release's parameter names. ``from_release_state_dict`` and
``to_release_state_dict`` convert between them and this project's modules; dead release weights (parameters
that reach no output, see ``_dead_release_shapes``) are dropped on the way in and written as zeros on the way
out, so that weights trained here load in the authors' code.

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

FORMAT_NAME = "dconet"
FORMAT_VERSION = 2   # 2: the BSGU's four gate convolutions as four modules (format 1 held them as one)

# Our name (the part after "stages.<k>.") -> the release's name (the part after "decos.<k>."), first match wins.
_RENAMES: list[tuple[str, object]] = [
    (r"dbem\.conv_(in|out)\.", lambda m: f"lowrank.unet.conv_{m[1]}."),
    (r"dbem\.encoders\.(\d+)\.axial\.conv_([hw])\.", lambda m: f"lowrank.unet.e{int(m[1]) + 1}.dw.dw_{m[2]}."),
    (r"dbem\.encoders\.(\d+)\.norm\.", lambda m: f"lowrank.unet.e{int(m[1]) + 1}.bn."),
    (r"dbem\.encoders\.(\d+)\.proj\.", lambda m: f"lowrank.unet.e{int(m[1]) + 1}.pw."),
    (r"dbem\.mdcr\.branches\.(\d+)\.", lambda m: f"lowrank.unet.b5.mdcr.block{int(m[1]) + 1}."),
    (r"dbem\.mdcr\.mix\.", lambda m: "lowrank.unet.b5.mdcr.out_s."),
    (r"dbem\.mdcr\.out\.", lambda m: "lowrank.unet.b5.mdcr.out."),
    (r"dbem\.soa\.qkv\.", lambda m: "lowrank.unet.b5.att.lnqkv."),
    (r"dbem\.soa\.proj\.", lambda m: "lowrank.unet.b5.att.ln."),
    (r"dbem\.decoders\.(\d+)\.proj_in\.", lambda m: f"lowrank.unet.d{5 - int(m[1])}.pw."),
    (r"dbem\.decoders\.(\d+)\.norm\.", lambda m: f"lowrank.unet.d{5 - int(m[1])}.bn."),
    (r"dbem\.decoders\.(\d+)\.axial\.conv_([hw])\.", lambda m: f"lowrank.unet.d{5 - int(m[1])}.dw.dw_{m[2]}."),
    (r"dbem\.decoders\.(\d+)\.proj_out\.", lambda m: f"lowrank.unet.d{5 - int(m[1])}.pw2."),
    (r"bsgu\.epsilon$", lambda m: "sparse.epsilon_per_channel"),
    (r"bsgu\.cell_bias$", lambda m: "sparse.conv_c.bias"),
    (r"bsgu\.conv_c\.", lambda m: "sparse.conv_c2."),
    (r"bsgu\.conv_(x|f|i|o|out)\.", lambda m: f"sparse.conv_{m[1]}."),
    (r"bsgu\.conv_g\.", lambda m: "sparse.cell_state."),
    (r"reconstruction\.body\.", lambda m: "merge.mapping."),
]


class CheckpointError(ValueError):
    """A weights file or state_dict that does not fit DCONet, or that may not be loaded safely."""


def _release_name(our_key: str) -> str:
    """The release's name for one of our state_dict keys."""
    m = re.match(r"stages\.(\d+)\.(.+)$", our_key)
    if not m:
        raise KeyError(f"not a DCONet parameter name: {our_key}")
    stage, rest = m[1], m[2]
    for pattern, replace in _RENAMES:
        r = re.match(pattern, rest)
        if r:
            return f"decos.{stage}." + replace(r) + rest[r.end():]
    raise KeyError(f"no release name known for {our_key}")


def _dead_release_shapes(stage: int, channels: int) -> dict[str, tuple[int, ...]]:
    """Release weights of one stage that reach no output: an unused conv stack in the background branch, the
    BSGU's conv_h, conv_x2 and conv_h2, conv_c's weight and conv_c2 in the first stage, conv_c later."""
    c = channels
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, 3, 3), (cout,)

    def norm(name: str) -> None:
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{field}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("lowrank.convs.0", 1, c)
    for i in (1, 4, 7, 10):
        norm(f"lowrank.convs.{i}")
    for i in (3, 6, 9):
        conv(f"lowrank.convs.{i}", c, c)
    conv("lowrank.convs.12", c, 1)
    conv("sparse.conv_h", 1, c)
    conv("sparse.conv_x2", c, c)
    conv("sparse.conv_h2", c, c)
    if stage == 0:
        shapes["sparse.conv_c.weight"] = (c, 1, 3, 3)
        conv("sparse.conv_c2", c, c)
    else:
        conv("sparse.conv_c", 1, c)
    return {f"decos.{stage}.{name}": shape for name, shape in shapes.items()}


def _listing(title: str, names: list[str], most: int = 12) -> str:
    shown = ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")
    return f"{title} ({len(names)}): {shown}"


def _check_fit(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], source: str,
               ignorable: set[str] = frozenset()) -> None:
    """Raise one CheckpointError naming every missing key, unexpected key and shape mismatch."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected and k not in ignorable)
    mismatched = sorted(f"{k} {tuple(given[k].shape)} (model: {tuple(expected[k])})"
                        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k]))
    problems = [_listing(title, names) for title, names in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if names]
    if problems:
        raise CheckpointError(f"{source} does not fit DCONet:\n  " + "\n  ".join(problems))


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the "module." prefix that DataParallel and DistributedDataParallel add."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _release_stage_count(state_dict: Mapping[str, torch.Tensor], source: str) -> int:
    stages = {int(m[1]) for k in state_dict if (m := re.match(r"decos\.(\d+)\.", k))}
    if not stages:
        raise CheckpointError(f"{source} holds no 'decos.<k>.' keys: it is not a DCONet release state_dict")
    if stages != set(range(len(stages))):
        raise CheckpointError(f"{source} holds stages {sorted(stages)}; expected 0..K-1 without gaps")
    return len(stages)


def from_release_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "the state_dict") -> DCONet:
    """Build a DCONet from a release-layout state_dict (e.g. an authors' best.pkl), K inferred from the keys.

    Accepts a "module." prefix and the release's dead weights (which are dropped). Raises CheckpointError naming
    the missing or unexpected keys and the shape mismatches.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source} is a {type(state_dict).__name__}, not a state_dict")
    state_dict = _strip_module_prefix(state_dict)
    stage_num = _release_stage_count(state_dict, source)
    conv_x = state_dict.get("decos.0.sparse.conv_x.weight")
    channels = int(conv_x.shape[0]) if isinstance(conv_x, torch.Tensor) else DCONetConfig.channels
    model = DCONet(DCONetConfig(stage_num=stage_num, channels=channels))
    names = {key: _release_name(key) for key in model.state_dict()}
    dead = {k for stage in range(stage_num) for k in _dead_release_shapes(stage, channels)}
    _check_fit({names[key]: tensor.shape for key, tensor in model.state_dict().items()}, state_dict, source,
               ignorable=dead)
    model.load_state_dict({key: state_dict[name] for key, name in names.items()}, strict=True)
    return model


def to_release_state_dict(model: DCONet) -> dict[str, torch.Tensor]:
    """The exact inverse of ``from_release_state_dict``: the release's key layout, dead weights as zeros."""
    model = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for stage in range(model.config.stage_num):
        for key, shape in _dead_release_shapes(stage, model.config.channels).items():
            dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
            out[key] = torch.zeros(shape, dtype=dtype)
    for key, tensor in model.state_dict().items():
        out[_release_name(key)] = tensor.detach().clone().cpu()
    return dict(sorted(out.items(), key=lambda kv: _release_sort_key(kv[0])))


def release_gradients(model: DCONet) -> dict[str, torch.Tensor]:
    """The gradients of ``model``'s parameters after a backward pass, keyed by the release's parameter names;
    parameters without a gradient are left out."""
    model = unwrap(model)
    return {_release_name(name): param.grad for name, param in model.named_parameters() if param.grad is not None}


def _release_sort_key(key: str) -> tuple:
    m = re.match(r"decos\.(\d+)\.(lowrank\.convs|lowrank\.unet|sparse|merge)", key)
    order = {"lowrank.convs": 0, "lowrank.unet": 1, "sparse": 2, "merge": 3}
    return (int(m[1]), order[m[2]], key) if m else (1 << 30, 0, key)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

def read_weights_file(path: str | Path, map_location: str | torch.device = "cpu"):
    """torch.load(path, weights_only=True), with errors that name the file and say what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused. The file holds Python objects beyond tensors and plain containers, and "
            f"unpickling them could run arbitrary code. If you trust its origin, load it once in a separate "
            f"script, save only its state_dict (torch.save(obj.state_dict(), ...)) and pass that file instead. "
            f"({str(error).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file (truncated or not a checkpoint?): "
                              f"{str(error).splitlines()[0]}") from None


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
    state = _strip_module_prefix(payload["model"])
    _check_fit({k: v.shape for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict(state, strict=True)
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DCONet, dict]:
    """Load a DCONet from either this project's checkpoint or a release best.pkl (detected, K inferred).

    Returns (model, info) with info = {"kind": "project" | "release", "config": ..., "meta": ...}; a project
    checkpoint written by training adds "train_config" (the run's settings).
    The model is on the CPU (or ``map_location``) in eval mode.
    """
    payload = read_weights_file(path, map_location)
    source = str(path)
    if _is_project_payload(payload):
        payload = _in_current_format(payload, path)
        model = model_from_payload(payload, source)
        info = {"kind": "project", "meta": payload.get("meta", {}),
                "train_config": payload.get("train_config") or payload.get("train_state", {}).get("config")}
    else:
        state = payload
        if isinstance(payload, dict) and isinstance(payload.get("state_dict"), Mapping):
            state = payload["state_dict"]
        if not (isinstance(state, Mapping) and any(re.match(r"(module\.)?decos\.\d+\.", str(k)) for k in state)):
            raise CheckpointError(f"{path}: neither a checkpoint of this project nor a DCONet release state_dict "
                                  f"(found {type(state).__name__}"
                                  + (f" with keys {sorted(map(str, state))[:5]}" if isinstance(state, Mapping) else "")
                                  + ")")
        model = from_release_state_dict(state, source)
        info = {"kind": "release", "meta": {}}
    info["config"] = model.config.to_dict()
    return model.eval(), info
