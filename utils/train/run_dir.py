"""A training run's bookkeeping: its folder, its checkpoints, its logs and how it resumes.

A run folder holds ``best.pkl`` (best validation mIoU), ``latest.pkl`` (the whole training state after the last
finished epoch), ``config.json``, ``log.txt``, ``curves.png`` (drawn from the log at each validation) and
TensorBoard event files. Nothing in it is replaced silently:

- the folder of the model this project ships (``model.config.SHIPPED_MODEL``, Weight/NUAA-SIRST, which is also
  NUAA-SIRST's default run folder) is never a run folder: training refuses it, with ``--resume`` or
  ``--overwrite`` too, and the message says to give the run its own ``--out``;
- a folder with a ``latest.pkl`` is continued with ``--resume`` or replaced with ``--overwrite``;
- a folder left by a run stopped before its first checkpoint (logs only) is simply started again in place, its
  log continuing; one that holds a ``best.pkl`` but no ``latest.pkl`` (stopped during its first epoch after a
  validation) has nothing to resume from and needs ``--overwrite`` (or another ``--out``), which the error says.

A stopped run's log says where it stopped (``interrupted in epoch ...``), and ``continue_hint`` gives the command
that goes on. Its TensorBoard event files are kept; each attempt's new event file begins with a purge at the
iteration it starts from (0 for a run started again in place, the checkpoint's for ``--resume``), so TensorBoard
shows every iteration once, from the attempt that trained it last.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import SHIPPED_MODEL, save_checkpoint
from utils import ProjectError
from utils.train.config import CHANGEABLE_ON_RESUME, TrainConfig, flatten_settings

RUN_FILES = ("best.pkl", "latest.pkl", "config.json", "log.txt", "curves.png")


class TrainingError(ProjectError, RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf: raised by the engine (on the CPU before the value reaches the weights, on a
    GPU when the loss is next read); the loop adds where (``at``) and the run stops, its latest.pkl keeping the
    last good state. Scripts exit with 1."""

    exit_code = 1

    def __init__(self, value: float, step: int):
        super().__init__(value, step)
        self.value, self.step = value, step
        self.epoch: int | None = None
        self.run_dir: Path | None = None

    def at(self, epoch: int, run_dir: Path) -> "NonFiniteLoss":
        self.epoch, self.run_dir = epoch, run_dir
        return self

    def __str__(self) -> str:
        text = f"the loss became {self.value} at iteration {self.step} of the epoch"
        if self.epoch is None:
            return text
        return (f"{text} (epoch {self.epoch}); the run stops here and {self.run_dir / 'latest.pkl'} keeps the last "
                f"good state. Lower --lr or turn off --amp/--bf16, then continue with --resume or start again "
                f"with --overwrite")


def continue_hint(config: TrainConfig) -> str:
    """What to run after a run of ``config`` stopped, judged by the checkpoints it left: the whole command."""
    run_dir = config.run_dir()
    data_root = "" if config.data_root == TrainConfig.data_root else f" --data-root {shlex.quote(config.data_root)}"
    if (run_dir / "latest.pkl").exists():
        return (f"{run_dir / 'latest.pkl'} holds the last finished epoch; continue with: "
                f"python run_0.py --out {shlex.quote(str(run_dir))}{data_root} --resume")
    again = (f"python run_0.py --config {shlex.quote(str(run_dir / 'config.json'))}"
             if (run_dir / "config.json").exists() else "the same command")
    if (run_dir / "best.pkl").exists():
        return (f"no epoch had finished, so there is nothing to resume from; start again with: {again} --overwrite "
                f"(it replaces the best.pkl of the first validations)")
    return f"no checkpoint was written; start again (in the same folder) with: {again}"


def refuse_shipped_model(config: TrainConfig) -> None:
    """A TrainingError when the run folder of ``config`` is the shipped model's (the same folder, however named)."""
    run_dir = config.run_dir()
    if run_dir.exists() and SHIPPED_MODEL.is_dir() and os.path.samefile(run_dir, SHIPPED_MODEL):
        held = ", ".join(sorted(p.name for p in SHIPPED_MODEL.iterdir()))
        raise TrainingError(
            f"{run_dir} is the NUAA-SIRST model shipped with this project ({held}), which t_models.py and "
            f"Detector() run when no weights are given; no training run writes there or replaces it. "
            f"Give the run a folder of its own: the same command with --out runs/{config.dataset}")


def _existing(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return sorted([name for name in RUN_FILES if (run_dir / name).exists()]
                  + [p.name for p in run_dir.glob("events.out.tfevents.*")])


def prepare_run_dir(config: TrainConfig) -> tuple[Path, bool]:
    """The run folder, checked against the never-overwrite-silently rule; returns (folder, created), ``created``
    telling whether this call made the folder (``remove_if_empty`` then takes it away if the start fails)."""
    refuse_shipped_model(config)
    run_dir = config.run_dir()
    existing = _existing(run_dir)
    if config.resume:
        if not (run_dir / "latest.pkl").exists():
            if "best.pkl" in existing:
                hint = ("the run stopped during its first epoch, so there is nothing to resume from: run it again "
                        "with --overwrite instead of --resume")
            elif existing:
                hint = ("the run stopped before its first checkpoint: run it again without --resume (it restarts "
                        "in place)")
            else:
                hint = "it holds no run: start it without --resume"
            raise TrainingError(f"--resume: {run_dir / 'latest.pkl'} does not exist; {hint}")
    elif existing and config.overwrite:
        for name in existing:
            (run_dir / name).unlink()
    elif "latest.pkl" in existing:
        raise TrainingError(f"{run_dir} already holds a run ({', '.join(existing[:5])}); continue it with --resume, "
                            f"start afresh with --overwrite, or pick another --out")
    elif "best.pkl" in existing:
        raise TrainingError(f"{run_dir} holds a best.pkl from a run stopped during its first epoch (no latest.pkl: "
                            f"nothing to resume from); run the same command again with --overwrite (which replaces "
                            f"it) or pick another --out")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, created


def remove_if_empty(run_dir: Path) -> None:
    """Take away a run folder that a failed start left empty."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        shutil.rmtree(run_dir)


def resumed_config(config: TrainConfig, stored: TrainConfig, given: frozenset[str]) -> TrainConfig:
    """The stored run's settings (its data root, device, ... included), with those of ``config`` that were
    ``given`` on the command line and may change on resume (``--epochs`` among them: a new total); a recipe setting
    given now that differs from the stored one is refused."""
    flat_now, flat_stored = flatten_settings(config.to_dict()), flatten_settings(stored.to_dict())
    changed = sorted(k for k in given - CHANGEABLE_ON_RESUME if flat_now[k] != flat_stored[k])
    if changed:
        raise TrainingError(
            "--resume continues a run with its own settings, but these differ from the stored ones: "
            + ", ".join(f"{k}={flat_now[k]!r} (run: {flat_stored[k]!r})" for k in changed)
            + "; drop them, or start a new run with --overwrite or another --out")
    flat_stored.update({k: flat_now[k] for k in CHANGEABLE_ON_RESUME if k in given or k in ("resume", "overwrite")})
    return TrainConfig.from_dict(flat_stored)


# ----------------------------------------------------------------------------------------------------------
# Random number generators
# ----------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state, as tensors and plain values (loads with weights_only=True)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    # A run saved on G GPUs may resume on any number of them, or on the CPU: the GPUs both runs have take
    # their saved states back, the others keep theirs (training draws nothing from the CUDA generators).
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def save_run_checkpoint(path: Path, model: torch.nn.Module, config: TrainConfig, progress: dict,
                        scores: dict | None = None, training_state: dict | None = None) -> None:
    """best.pkl (weights, the run's settings, its scores) or, with ``training_state`` (optimizer, scheduler and
    scaler states), latest.pkl, which also holds the RNG states: everything a resumed run needs.
    ``progress``: epoch, global_step, best_miou, best_epoch, best_step. Written atomically."""
    meta = {"dataset": config.dataset, "base_size": config.base_size, "scores": scores or {}, **progress}
    if training_state is None:
        save_checkpoint(path, model, meta=meta, train_config=config.recipe())
    else:
        state = {"config": config.to_dict(), **training_state, **progress, "rng": rng_state()}
        save_checkpoint(path, model, meta=meta, train_state=state)


# ----------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------

class RunLog:
    """Lines to the console and to log.txt (both time-stamped), scalars and pictures to TensorBoard; on rank 0 only.

    Console lines go through tqdm.write, so that a progress bar on a terminal stays whole; redirected output
    gets the same lines (and no bar)."""

    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None):
        self.path = run_dir / "log.txt"
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"       # the same line on the console and in the log
        tqdm.write(stamped, file=sys.stdout)
        sys.stdout.flush()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(stamped + "\n")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_images(tag, images, step)

    def write_config(self, config: TrainConfig) -> None:
        if self.enabled:
            (self.path.parent / "config.json").write_text(json.dumps(config.recipe(), indent=1) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds: float) -> str:
    """3 d 4 h, 2 h 05 min, 7 min 12 s, 42 s."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
