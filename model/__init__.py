"""DCONet in PyTorch: the model, its deploy form for inference, and its checkpoints.

Its names load when first used (``from model import DCONet`` imports torch then), so that ``model.config``, which
imports no torch, serves code that runs without PyTorch (onnx_detect.py)."""
from __future__ import annotations

import importlib
import sys
import types

_WHERE = {
    "average": ("average_models",),
    "capabilities": ("HasKernels", "HasLayout", "Reparameterizable"),
    "checkpoint": ("load_checkpoint", "load_model", "save_checkpoint"),
    "config": ("DCONetConfig", "StageOutput", "SIZE_MULTIPLE", "SHIPPED_MODEL"),
    "dconet": ("DCONet", "unwrap"),
    "deploy": ("DeployedDCONet", "deploy", "is_deployed"),
    "release": ("CheckpointError", "from_release_state_dict", "to_release_state_dict"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """This package: ``model.deploy`` is the function ``deploy``, also once its module (model/deploy.py) is
    imported, which would otherwise set the package's attribute of that name to the module."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _MODULE_OF and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
