"""The pipeline around the model, in rooms that follow the flow data -> train -> export -> score.

    io/      reading and writing images and videos, the release's geometry, device and runtime set-up
    data/    finding and checking data-set files, data sets, synthetic sets and sequences
    train/   settings, engine (train_one_epoch, evaluate), losses, schedule, run folders, the epoch loop,
             distributed set-up, learning curves
    score/   metrics under both protocols, components, ROC, scoring folders and reports, their figures
    export/  geometry and predictions, files out, detections and their table, panels
    cli.py   the scripts' shared error-to-exit-code handling

The import rule runs one way (tests/test_layout.py holds it):

    io      imports nothing else of utils, and not the model
    data    may use io
    score   may use io
    train   may use io, data, score and the model
    export  may use io, score and the model
    nothing imports the scripts (run_0.py, t_models.py, cal_from_mask.py, plot_curves.py, onnx_detect.py)

Each room's __init__ re-exports its public names; they load when first used, so importing a room costs nothing
(t_models.py, for one, must set OpenMP's environment before torch loads).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

# room -> the rooms it may import (besides itself); "model" is the network package
ALLOWED_IMPORTS = {
    "io": set(),
    "data": {"io"},
    "score": {"io"},
    "train": {"io", "data", "score", "model"},
    "export": {"io", "score", "model"},
}


class ProjectError(Exception):
    """An error whose message says what happened and what to do; a script that meets it prints that one line
    and exits with ``exit_code`` (utils/cli.py)."""

    exit_code = 2


def lazy_exports(package: str, where: dict[str, tuple[str, ...]]) -> tuple[Callable, Callable]:
    """A module ``__getattr__`` and ``__dir__`` for ``package`` that import each public name from its module
    (``where``: module -> names) on first use."""
    module_of = {name: module for module, names in where.items() for name in names}

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(module_of)

    return __getattr__, __dir__
