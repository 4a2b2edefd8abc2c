"""The settings of a training run: one dataclass whose defaults are the authors' recipe, and its command line.

    config = parse_command_line(["--dataset", "NUAA-SIRST", "--stage-num", "3"])[0]
    config.model            # DCONetConfig(stage_num=3, channels=32): the network, stored in every checkpoint
    config.runtime          # RuntimeOptions(device="auto", ...): where and how to run, shared with t_models.py

The command line is flat (``--stage-num``, ``--device``); the configuration nests the model's and the runtime's
settings. ``config.json`` in a run folder holds ``asdict(config)`` and can be given back with ``--config FILE``
(flags given with it still win).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from model import DCONetConfig
from utils.io.images import MASK_RESAMPLING
from utils.io.runtime import RETIRED, RuntimeOptions, flag_name, setting

AUGMENT_MODES = ("auto", "on", "off")
MEMORY_FORMATS = ("contiguous", "channels_last", "auto")
GEOMETRIES = ("resize", "native")
KEEP_CHOICES = ("best", "last")
KERNELS = ("fast", "plain")
AMP_DTYPES = ("auto", "bf16", "fp16")
# A laptop-sized recipe for the built-in synthetic set, applied to every setting the command line leaves out.
DEMO_DEFAULTS = {"epochs": 12, "base_size": 64, "stage_num": 2, "lr": 1e-3}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. The defaults are the authors' recipe (DCONet release, run_0.py)."""

    dataset: str = setting("IRSTD-1k", "data set folder under --data-root (NUDT-SIRST, IRSTD-1k, sirst_aug, "
                                        "NUAA-SIRST or any other in that layout), or 'demo': the built-in "
                                        "synthetic set")
    data_root: str = setting("datasets", "folder holding the data sets", changeable=True)
    out: str = setting("", "run folder (default: Weight/<dataset>)", changeable=True)
    epochs: int = setting(400, "training epochs. With --resume, a new total that extends a finished or interrupted "
                                "run: the poly schedule is recomputed over the new total and continues from the "
                                "current iteration, lr(it) = LR x (1 - it / (EPOCHS x iterations per epoch)) ** "
                                "POLY_POWER (so the lr rises again when a finished run is extended)", changeable=True)
    batch_size: int = setting(8, "images per iteration (per process under torchrun); the last, smaller batch of "
                                  "an epoch is used, as in the release")
    lr: float = setting(1e-4, "Adam learning rate")
    weight_decay: float = setting(0.0, "Adam weight decay")
    poly_power: float = setting(0.9, "poly schedule: lr = base * (1 - it / total) ** power, stepped every iteration")
    base_size: int = setting(256, "images resized to base_size x base_size as the release does (8-bit image "
                                   "INTER_LINEAR then /255; mask INTER_NEAREST, labels mask/max)")
    crop_size: int = setting(0, "> 0: train on random crops of this size (after the resize; with --geometry native "
                                "the window size, default base_size)")
    geometry: str = setting("resize", "how frames reach the network in training and validation: resize (the "
                                      "release: every frame resized to base_size x base_size) or native (each frame "
                                      "at its own scale: training on random base_size windows that hold a target, "
                                      "rescaled by --scale-min..--scale-max; validation on whole frames padded to "
                                      "multiples of 32, as t_models.py --native exports)", GEOMETRIES)
    scale_min: float = setting(1.0, "the smallest random resize factor of a training sample (drawn log-uniformly "
                                    "per sample): with --geometry native of its window; with resize of the resized "
                                    "frame, then shown in a base_size window (reflect-padded when smaller, holding a "
                                    "target when larger): the scales of larger frames squashed to base_size")
    scale_max: float = setting(1.0, "the largest random resize factor of a training sample (see --scale-min)")
    negatives: str = setting("", "frames with no target mixed into training: a folder of images, or a data set "
                                 "folder whose trainval masks are all empty (e.g. SIRST-V2's background frames); "
                                 "part of them held out by whole groups (--negative-val-split) to count false "
                                 "targets per frame in validation")
    negative_rate: float = setting(0.25, "with --negatives: the fraction of each epoch's samples that are negatives")
    negative_val_split: float = setting(0.2, "with --negatives: hold out at least this fraction of the negative "
                                             "frames, as whole groups (a sensor or sequence: the file stem without "
                                             "its trailing number)")
    negative_val_every: int = setting(1, "with --negatives: count false targets on the held-out negatives at the end "
                                         "of every this many epochs (and of the last)", changeable=True)
    mask_resampling: str = setting("release", "how masks are resized to base_size: release (cv2.INTER_NEAREST, "
                                               "as the release; small targets' labels shift by up to half a pixel "
                                               "against the image) or centres (nearest at pixel centres, aligned "
                                               "with the image; this project's option)", MASK_RESAMPLING)
    augment: str = setting("auto", "random flips and transpose: auto (sirst_aug only, as the release), on, off",
                            AUGMENT_MODES)
    model: DCONetConfig = field(default_factory=DCONetConfig)
    mse_weight: float = setting(0.1, "loss = SoftIoU(T, mask) + mse_weight * MSE(D, image)")
    bce_weight: float = setting(0.0, "> 0: add bce_weight * binary cross-entropy of T against the mask (averaged "
                                     "over the pixels) to the loss, whose gradient does not vanish where sigmoid(T) "
                                     "saturates (0: off, as the release)")
    ema: float = setting(0.0, "> 0: also keep an exponential moving average of the weights, updated after every "
                              "step with this decay (0.99: about the last 100 steps), with the BatchNorm statistics "
                              "of the trained weights; validation, best.pkl and so the export use it (0: off, as "
                              "the release)")
    keep: str = setting("best", "which weights best.pkl holds: best (those of the validation with the highest "
                                "mIoU, as the release) or last (those of the last validation: the end of the run)",
                        KEEP_CHOICES)
    init: str = setting("", "start from the weights in this file instead of a random initialisation: a checkpoint "
                            "of this project (e.g. Weight/NUAA-SIRST/best.pkl) or an authors' best.pkl, its K and "
                            "width taken as the model's; the optimizer, the lr schedule and --ema start afresh "
                            "(fine-tuning)")
    seed: int = setting(1, "seed of initialisation, shuffling, augmentation and the val split")
    val_split: float = setting(0.0, "> 0: hold this fraction of trainval out for validation and best.pkl "
                                     "(0: validate on the test split, as the release)")
    save_iter_step: int = setting(100, "also validate (and keep best.pkl) every this many iterations, as the "
                                        "release's run does; 0: after each epoch only", changeable=True)
    log_every: int = setting(10, "a log line (loss parts, lr, iterations/s, time left) every this many iterations; "
                                  "0: none", changeable=True)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    amp: bool = setting(False, "CUDA mixed precision: bfloat16 on GPUs that have it natively (compute capability 8.0 "
                               "and up), else float16 with loss scaling (--amp-dtype forces either)", changeable=True)
    amp_dtype: str = setting("auto", "the dtype of --amp: auto, bf16 or fp16 (fp16 trains with loss scaling)",
                             AMP_DTYPES, changeable=True)
    sync_bn: bool = setting(False, "under torchrun, every BatchNorm (MDCR's shared one included) normalises with the "
                                   "statistics of all ranks' batches instead of its rank's share (GPUs or CPUs)",
                            changeable=True)
    memory_format: str = setting("contiguous", "activation layout in training: contiguous (NCHW) or channels_last "
                                                "(NHWC: faster steps on the CPU, but PyTorch's channels_last "
                                                "BatchNorm sums batch statistics less exactly; which is faster "
                                                "depends on the CPU) or auto (on the CPU a probe of a few steps of "
                                                "each at the start of the run keeps the faster, as cudnn.benchmark "
                                                "does; on a GPU contiguous)", MEMORY_FORMATS, changeable=True)
    kernels: str = setting("fast", "training kernels: fast (the blocks' speed kernels, the same results to float "
                                    "rounding: the BSGU's gates as one composed 5x5 convolution; on the CPU also "
                                    "hand-written one-channel convolutions, on CUDA cuDNN's) or plain (the paper's "
                                    "forward in plain PyTorch)", KERNELS, changeable=True)
    checkpointing: bool = setting(False, "recompute each stage's activations in the backward pass: a fraction of "
                                          "the memory for about 1.2-1.3x the step time; the same results", changeable=True)
    workers: int = setting(-1, "DataLoader worker processes (-1: 2 on CUDA, 0 on CPU)", changeable=True)
    vis_images: int = setting(4, "validation images shown in TensorBoard", changeable=True)
    resume: bool = setting(False, "continue the run in the run folder from its latest.pkl", changeable=True)
    overwrite: bool = setting(False, "start afresh in a run folder that already holds a run (its files are replaced)", changeable=True)

    def __post_init__(self) -> None:
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {self.augment!r}")
        if self.mask_resampling not in MASK_RESAMPLING:
            raise ValueError(f"mask_resampling must be one of {', '.join(MASK_RESAMPLING)}, "
                             f"got {self.mask_resampling!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {self.keep!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"--scale-min and --scale-max must satisfy 0 < min <= max, got {self.scale_min}, "
                             f"{self.scale_max}")
        if not 0 < self.negative_rate < 1 or not 0 <= self.negative_val_split < 1:
            raise ValueError(f"--negative-rate must lie in (0, 1) and --negative-val-split in [0, 1), got "
                             f"{self.negative_rate} and {self.negative_val_split}")
        if self.negative_val_every < 1:
            raise ValueError(f"negative_val_every must be at least 1, got {self.negative_val_every}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")
        for name in ("epochs", "batch_size", "base_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("crop_size", "save_iter_step", "log_every", "vis_images", "mse_weight", "bce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1), got {self.ema} (0.99 averages about the last 100 steps)")
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"val_split must lie in [0, 1), got {self.val_split}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: pick one")

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("Weight") / self.dataset

    def augment_enabled(self) -> bool:
        return self.augment == "on" or (self.augment == "auto" and self.dataset.lower() == "sirst_aug")

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe(self) -> dict:
        """``to_dict()`` without resume and overwrite, which say how a run was started, not what it computes: the
        settings config.json and best.pkl keep, to give back with --config (a resumed run's too)."""
        return asdict(replace(self, resume=False, overwrite=False))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The inverse of ``to_dict``; also reads the flat layout of earlier versions (stage_num, device, ...
        at the top level). Unknown keys are an error that names them."""
        values = dict(values)
        nested = {"model": (DCONetConfig, dict(values.pop("model", {}) or {})),
                  "runtime": (RuntimeOptions, dict(values.pop("runtime", {}) or {}))}
        for name, (kind, inner) in nested.items():
            for f in fields(kind):
                if f.name in values:
                    inner.setdefault(f.name, values.pop(f.name))
        for retired in RETIRED & set(values):
            nested["runtime"][1].setdefault(retired, values.pop(retired))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**values, model=DCONetConfig(**nested["model"][1]), runtime=RuntimeOptions.from_dict(nested["runtime"][1]))


def _flat_settings() -> list[tuple[str, object, dict]]:
    """(name, default, metadata: help, choices, changeable) of every command-line setting, the nested model and
    runtime settings flattened; the model's and the runtime's may always change on resume, see ``setting``."""
    out = []
    for f in fields(TrainConfig):
        if f.name == "model":
            out += [(g.name, g.default, {"choices": None, "changeable": False, **g.metadata})
                    for g in fields(DCONetConfig)]
        elif f.name == "runtime":
            out += [(g.name, g.default, dict(g.metadata)) for g in fields(RuntimeOptions)]
        else:
            out.append((f.name, f.default, dict(f.metadata)))
    return out


# Settings that may differ between a run and its resumption (marked in their fields); every other one must stay.
CHANGEABLE_ON_RESUME = frozenset(name for name, _, meta in _flat_settings() if meta["changeable"])


def build_arg_parser() -> argparse.ArgumentParser:
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items())
    parser = argparse.ArgumentParser(
        description="Train DCONet with the authors' recipe; every default below is the release's. "
                    f"With --dataset demo, settings not given default to {demo}.")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="start from the settings in FILE (a run folder's config.json); flags given too win")
    for name, default, meta in _flat_settings():
        flag, help_text, choices = flag_name(name), meta["help"], meta["choices"]
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=None, choices=choices,
                                metavar=None if choices else name.upper(),
                                help=f"{help_text} (default: {default})" if default != "" else help_text)
    return parser


def parse_command_line(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """(TrainConfig, the names of the settings given on the command line). With --config FILE the settings
    start from the file; with --dataset demo the settings left out come from DEMO_DEFAULTS."""
    args = vars(build_arg_parser().parse_args(argv))
    config_file = args.pop("config")
    given = {k: v for k, v in args.items() if v is not None}
    base: dict = {}
    if config_file is not None:
        try:
            base = TrainConfig.from_dict(json.loads(Path(config_file).read_text())).to_dict()
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"--config {config_file}: not a readable training configuration ({error}); give a "
                             f"config.json written by run_0.py") from None
    flat = flatten_settings(base)
    flat.update(given)
    if flat.get("dataset") == "demo" and config_file is None:
        flat.update({k: v for k, v in DEMO_DEFAULTS.items() if k not in given})
    return TrainConfig.from_dict(flat), frozenset(given)


def flatten_settings(values: dict) -> dict:
    """A ``TrainConfig.to_dict()`` with the model's and the runtime's settings at the top level, as the flags
    name them."""
    flat = {k: v for k, v in values.items() if k not in ("model", "runtime")}
    for key in ("model", "runtime"):
        flat.update(values.get(key, {}))
    return flat
