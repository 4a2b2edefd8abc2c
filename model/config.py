"""The model's configuration: a dataclass whose defaults are the authors' release."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


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
