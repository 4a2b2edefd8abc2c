"""The model's configuration (a dataclass whose defaults are the authors' release) and the facts about its input and
outputs that code without PyTorch needs too (the ONNX runner, onnx_detect.py): the multiple its input sides must be,
what a stage gives, and where the model this project ships lies. Plain Python: nothing here imports torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

SIZE_MULTIPLE = 32  # five 2x2 poolings in the DBEM: input heights and widths are multiples of this

# The model this project ships (Weight/NUAA-SIRST/README.md), found beside the code whatever the working folder:
# what t_models.py and the Detector run when no weights are given, and a folder no training run writes into.
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "Weight" / "NUAA-SIRST"


class StageOutput(NamedTuple):
    """What one stage produced: background B, target layer T (logits) and reconstruction D, each (N, 1, H, W)
    tensors in the network (as numpy arrays (H, W) once exported, ``utils.export.maps.Prediction.stages``)."""

    B: Any
    T: Any
    D: Any


@dataclass(frozen=True)
class DCONetConfig:
    """Structure of a DCONet model; the defaults are the release's model factory. Each field's help text is its
    command-line help (run_0.py)."""

    stage_num: int = field(default=5, metadata={"help": "K, the number of stages"})
    channels: int = field(default=32, metadata={"help": "width of the BSGU cell and the reconstruction network"})

    def __post_init__(self) -> None:
        if not isinstance(self.stage_num, int) or self.stage_num < 1:
            raise ValueError(f"stage_num must be a positive integer, got {self.stage_num!r}")
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DCONetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DCONet config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
