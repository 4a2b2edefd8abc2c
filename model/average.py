"""Weight averages of DCONet models: parameter by parameter, BatchNorm statistics alike, each input given a share.

Two models averaged this way are a model when they share their start: a fine-tuning run and the weights it started
from (a weight-space ensemble). Each input loads as ``load_model`` loads it (a latest.pkl of a run with ``--ema`` as
its moving average; an authors' best.pkl converted).
"""
from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import load_model
from .dconet import DCONet
from .release import CheckpointError


def check_shares(shares: list[float], count: int) -> list[float]:
    """The inputs' shares of the average, refused unless there is one per input, each at least 0, adding up to 1."""
    if len(shares) != count:
        raise ValueError(f"{len(shares)} share(s) for {count} model(s); give one share per model, in the same "
                         f"order")
    if any(not math.isfinite(w) or w < 0 for w in shares):
        raise ValueError(f"shares {shares}: each must be a number of at least 0")
    if abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"shares {shares} add up to {sum(shares):g}; they must add up to 1 (0.75 0.25, say)")
    return [float(w) for w in shares]


def average_models(paths: list[str | Path], shares: list[float]) -> tuple[DCONet, dict]:
    """The average sum(w_i * model_i) of the models in ``paths`` and what it came from.

    Floating-point tensors (weights, BatchNorm means and variances) are averaged in float64 and stored in their
    type; integer ones (BatchNorm's batch counters) are the first input's. All inputs must have the same K and
    width. Returns (model in eval mode on the CPU, info) with info = {"config", "meta", "train_config"}: meta lists
    each input with its share and gives the first input's training size and data set; train_config is the first
    input's that has one.
    """
    if len(paths) < 2:
        raise ValueError(f"{len(paths)} model(s) given; averaging needs two or more")
    shares = check_shares(list(shares), len(paths))
    loaded = [(Path(path), *load_model(path)) for path in paths]
    first_path, first, first_info = loaded[0]
    for path, model, info in loaded[1:]:
        if model.config != first.config:
            raise CheckpointError(f"{path}: K = {model.config.stage_num}, width {model.config.channels}, but "
                                  f"{first_path}: K = {first.config.stage_num}, width {first.config.channels}; only "
                                  f"models of one structure average (a fine-tuning run and the weights it started "
                                  f"from)")
    states = [model.state_dict() for _, model, _ in loaded]
    averaged = {}
    for key, tensor in states[0].items():
        if tensor.is_floating_point():
            total = sum(w * state[key].double() for w, state in zip(shares, states))
            averaged[key] = total.to(tensor.dtype)
        else:
            averaged[key] = tensor.clone()
    model = DCONet(first.config)
    model.load_state_dict(averaged, strict=True)
    meta = {"average_of": [{"file": str(path), "share": w, "weights": info["weights"]}
                           for (path, _, info), w in zip(loaded, shares)]}
    size = first_info.get("meta", {}).get("base_size") or (first_info.get("train_config") or {}).get("base_size")
    if size is not None:
        meta["base_size"] = size
    if first_info.get("meta", {}).get("dataset"):
        meta["dataset"] = first_info["meta"]["dataset"]
    train_config = next((info["train_config"] for _, _, info in loaded if info.get("train_config")), None)
    return model.eval(), {"config": first.config.to_dict(), "meta": meta, "train_config": train_config}
