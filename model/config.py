"""The model's configuration: a dataclass whose defaults are the authors' release."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class DCONetConfig:
    """Structure of a DCONet model.

    Args:
        stage_num: K, the number of unrolled stages (the release's model factory uses 5).
        channels: width of the BSGU cell and of the reconstruction network (32 in the release).
    """

    stage_num: int = 5
    channels: int = 32

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
