"""The authors' release layout (best.pkl): the one place that knows the release's parameter names.

``from_release_state_dict`` and ``to_release_state_dict`` convert between them and this project's modules; dead
release weights (parameters that reach no output, see ``_dead_release_shapes``) are dropped on the way in and
written as zeros on the way out, so that weights trained here load in the authors' code. Reading files is
``model.checkpoint``'s.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .config import DCONetConfig
from .dconet import DCONet, unwrap

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


def check_fit(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], source: str,
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


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    state_dict = strip_module_prefix(state_dict)
    stage_num = _release_stage_count(state_dict, source)
    conv_x = state_dict.get("decos.0.sparse.conv_x.weight")
    channels = int(conv_x.shape[0]) if isinstance(conv_x, torch.Tensor) else DCONetConfig.channels
    model = DCONet(DCONetConfig(stage_num=stage_num, channels=channels))
    names = {key: _release_name(key) for key in model.state_dict()}
    dead = {k for stage in range(stage_num) for k in _dead_release_shapes(stage, channels)}
    check_fit({names[key]: tensor.shape for key, tensor in model.state_dict().items()}, state_dict, source,
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
