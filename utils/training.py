"""Training with the release's recipe: configuration, one epoch, validation, checkpoints and resume.

``run_0.py`` parses the command line into a ``TrainConfig`` and calls ``fit``; the tests call the same functions.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import DCONet, DCONetConfig, load_checkpoint, save_checkpoint
from model.checkpoint import CheckpointError
from model.fast import FastDCONet, optimize_for_inference

from . import distributed as dist_utils
from .cpu_memory import MODES, configure_cpu_malloc
from .data import DatasetError, build_datasets, target_pixels
from .losses import dconet_loss
from .metrics import PRESETS, Evaluator
from .schedule import poly_scheduler
from .synthetic import ensure_demo_dataset

RUN_FILES = ("best.pkl", "latest.pkl", "config.json", "log.txt")
# In-training validation, as the release's: pixels with T > 0 against the pixels at the mask's maximum, at the
# training size, summed over the set (mIoU); the other scores by the standard protocol's rules.
VALIDATION = replace(PRESETS["standard"], name="validation", seg_score="logit", seg_threshold=0.0,
                     det_score="logit", det_threshold=0.0)


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def _setting(default, help_text: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the authors' recipe (DCONET.md section 6)."""

    dataset: str = _setting("IRSTD-1k", "data set folder under --data-root (NUDT-SIRST, IRSTD-1k, sirst_aug, "
                                        "NUAA-SIRST or any other in that layout), or 'demo': the built-in synthetic set")
    data_root: str = _setting("datasets", "folder holding the data sets")
    out: str = _setting("", "run folder (default: Weight/<dataset>)")
    epochs: int = _setting(400, "training epochs")
    batch_size: int = _setting(8, "images per iteration (per process under torchrun)")
    lr: float = _setting(1e-4, "Adam learning rate")
    weight_decay: float = _setting(0.0, "Adam weight decay")
    poly_power: float = _setting(0.9, "poly schedule: lr = base * (1 - it / total) ** power, stepped every iteration")
    base_size: int = _setting(256, "images resized to base_size x base_size as the release does (8-bit image "
                                   "INTER_LINEAR then /255; mask INTER_NEAREST, labels mask/max)")
    crop_size: int = _setting(0, "> 0: train on random crops of this size (after the resize)")
    augment: str = _setting("auto", "random flips and transpose: auto (sirst_aug only, as the release), on, off",
                            ("auto", "on", "off"))
    stage_num: int = _setting(5, "K, the number of stages")
    channels: int = _setting(32, "width of the BSGU cell and the reconstruction network")
    mse_weight: float = _setting(0.1, "loss = SoftIoU(T, mask) + mse_weight * MSE(D, image)")
    seed: int = _setting(1, "seed of initialisation, shuffling, augmentation and the val split")
    val_split: float = _setting(0.0, "> 0: hold this fraction of trainval out for validation and best.pkl "
                                     "(default: validate on the test split, as the release)")
    save_iter_step: int = _setting(100, "also validate (and keep best.pkl) every this many iterations, as the "
                                        "release's run does; 0: after each epoch only")
    device: str = _setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    amp: bool = _setting(False, "CUDA mixed precision (bf16 where supported, else fp16 with loss scaling)")
    bf16: bool = _setting(False, "bf16 autocast on CPU or CUDA")
    compile: bool = _setting(False, "torch.compile the model")
    memory_format: str = _setting("contiguous", "activation layout in training: contiguous (NCHW) or channels_last "
                                                "(NHWC: about 1.3x faster steps on the CPU, but PyTorch's "
                                                "channels_last BatchNorm sums batch statistics less exactly: "
                                                "train-mode outputs 7e-5 to 1.2e-4 from the release's instead of "
                                                "1.3e-5)", ("contiguous", "channels_last"))
    cpu_malloc: str = _setting("auto", "CPU memory (glibc): keep freed memory for reuse instead of returning large "
                                       "blocks to the system: up to 2x faster steps at batch 8 for a higher peak "
                                       "(auto: keep on the CPU); system: the C library's defaults", MODES)
    checkpointing: bool = _setting(False, "recompute each stage's activations in the backward pass: about 2.7x "
                                          "less memory for about 1.3x the step time; the same results")
    workers: int = _setting(-1, "DataLoader worker processes (-1: 2 on CUDA, 0 on CPU)")
    vis_images: int = _setting(4, "validation images shown in TensorBoard")
    resume: bool = _setting(False, "continue the run in the run folder from its latest.pkl")
    overwrite: bool = _setting(False, "start afresh in a run folder that already holds a run (its files are replaced)")

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("Weight") / self.dataset

    def augment_enabled(self) -> bool:
        if self.augment not in ("auto", "on", "off"):
            raise ValueError(f"augment must be auto, on or off, got {self.augment!r}")
        return self.augment == "on" or (self.augment == "auto" and self.dataset.lower() == "sirst_aug")


# A laptop-sized recipe for the built-in synthetic set, applied to every setting the command line leaves out.
DEMO_DEFAULTS = dict(epochs=12, base_size=64, stage_num=2, lr=1e-3)


def build_arg_parser() -> argparse.ArgumentParser:
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items())
    parser = argparse.ArgumentParser(
        description="Train DCONet with the authors' recipe; every default below is the release's. "
                    f"With --dataset demo, settings not given default to {demo}.")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=None, choices=f.metadata["choices"],
                                metavar=None if f.metadata["choices"] else f.name.upper(),
                                help=f"{help_text} (default: {f.default!r})")
    return parser


def parse_command_line(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """(TrainConfig, the names of the settings given) from command-line arguments; with --dataset demo the
    settings left out come from DEMO_DEFAULTS."""
    given = {k: v for k, v in vars(build_arg_parser().parse_args(argv)).items() if v is not None}
    config = TrainConfig(**given)
    if config.dataset == "demo":
        config = replace(config, **{k: v for k, v in DEMO_DEFAULTS.items() if k not in given})
    return config, frozenset(given)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_command_line(argv)[0]


# ----------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------

def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run folder, checked against the never-overwrite-silently rule."""
    run_dir = config.run_dir()
    existing = [name for name in RUN_FILES if (run_dir / name).exists()] + \
               [p.name for p in run_dir.glob("events.out.tfevents.*")] if run_dir.exists() else []
    if config.resume and config.overwrite:
        raise TrainingError("--resume and --overwrite exclude each other: pick one")
    if config.resume:
        if not (run_dir / "latest.pkl").exists():
            raise TrainingError(f"--resume: {run_dir / 'latest.pkl'} does not exist; start the run without --resume")
    elif existing:
        if not config.overwrite:
            raise TrainingError(f"{run_dir} already holds a run ({', '.join(sorted(existing)[:5])}); "
                                f"continue it with --resume, start afresh with --overwrite, or pick --out")
        for name in existing:
            (run_dir / name).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def rng_state() -> dict:
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_loader(dataset, config: TrainConfig, *, train: bool, epoch: int, info: dist_utils.DistInfo,
                device: torch.device) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): the same on a resumed run as on an unbroken one."""
    workers = config.workers if config.workers >= 0 else (2 if device.type == "cuda" else 0)
    if train:
        dataset.set_epoch(epoch)
        if info.enabled:
            sampler = torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=True,
                                                          seed=config.seed, drop_last=False)
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    else:
        sampler = None
    # drop_last=False as in the release: the last, smaller batch is trained on and the poly schedule counts it
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      drop_last=False, pin_memory=device.type == "cuda")


def autocast_context(config: TrainConfig, device: torch.device):
    """bf16 autocast (--bf16, CPU or CUDA), CUDA mixed precision (--amp), or nothing."""
    if config.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if config.amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def predict_logits(model: torch.nn.Module, dataset, indices: list[int], config: TrainConfig,
                   device: torch.device) -> dict[int, np.ndarray]:
    """Target logits T (H, W) float32 of the given samples, keyed by index, in eval mode.

    ``model`` is a DCONet (run under the config's autocast) or the module of ``optimize_for_inference`` (which
    holds its own precision)."""
    model.eval()
    own_precision = isinstance(model, FastDCONet)
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(indices), config.batch_size):
        chunk = indices[start:start + config.batch_size]
        images = torch.stack([dataset[i]["image"] for i in chunk]).to(device)
        with nullcontext() if own_precision else autocast_context(config, device):
            _, T = model(images)
        for i, t in zip(chunk, T.float().cpu().numpy()):
            out[i] = t[0]
    return out


def evaluate(model: torch.nn.Module, dataset, config: TrainConfig, device: torch.device,
             info: dist_utils.DistInfo = dist_utils.DistInfo()) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """Validation scores (``VALIDATION``) of ``model`` on ``dataset``; each rank predicts its share, rank 0 scores all.

    Returns (scores, logits of the first ``config.vis_images`` samples for pictures); every rank gets the scores.
    """
    shard = list(range(info.rank, len(dataset), info.world_size))
    logits = predict_logits(model, dataset, shard, config, device)
    gathered = dist_utils.gather_objects(info, logits) if info.enabled else [logits]
    scores = None
    if info.is_main:
        merged: dict[int, np.ndarray] = {}
        for part in gathered:
            merged.update(part)
        evaluator = Evaluator(VALIDATION)
        for i in range(len(dataset)):
            item = dataset[i]
            evaluator.update(merged[i], target_pixels(item["mask"][0].numpy()), name=item["stem"])
        scores = evaluator.compute()
        vis = {i: merged[i] for i in range(min(config.vis_images, len(dataset)))}
    else:
        vis = {}
    scores = dist_utils.broadcast_object(info, scores)
    return scores, vis


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

# Settings that may differ between a run and its resumption; every other one must stay as it was.
RUNTIME_FIELDS = frozenset({"device", "workers", "vis_images", "resume", "overwrite", "compile", "amp", "bf16",
                            "memory_format", "checkpointing", "cpu_malloc", "save_iter_step", "data_root", "out"})


class Run:
    """One training run: model, optimizer, schedule, data, logs and the state that a checkpoint must keep."""

    def __init__(self, config: TrainConfig, explicit: frozenset[str] = frozenset()):
        self.info = dist_utils.init_distributed(select_device(config.device).type)
        self.device = select_device(config.device)
        self.malloc = configure_cpu_malloc(config.cpu_malloc, self.device.type)
        if self.device.type == "cuda" and self.info.enabled:
            self.device = torch.device("cuda", self.info.local_rank)
        self.run_dir = config.run_dir()
        if self.info.is_main:
            prepare_run_dir(config)
        dist_utils.barrier(self.info)
        self.payload = None
        if config.resume:
            self.payload = load_checkpoint(self._checked_latest(), map_location="cpu")
            config = self._resumed_config(config, explicit)
        self.config = config
        seed_everything(config.seed)

        if config.dataset == "demo" and self.info.is_main:
            ensure_demo_dataset(config.data_root, **DEMO_DATA)
        dist_utils.barrier(self.info)
        self.data = build_datasets(config.data_root, config.dataset, base_size=config.base_size,
                                   augment=config.augment_enabled(), crop_size=config.crop_size or None,
                                   val_split=config.val_split, seed=config.seed)
        self.iters_per_epoch = len(make_loader(self.data.train, config, train=True, epoch=0, info=self.info,
                                               device=self.device))
        if self.iters_per_epoch == 0:
            raise TrainingError(f"the train split of {config.dataset} yields no batch of {config.batch_size}")
        self.total_iterations = config.epochs * self.iters_per_epoch

        self.model = DCONet(DCONetConfig(stage_num=config.stage_num, channels=config.channels)).to(self.device)
        self.model.set_channels_last(config.memory_format == "channels_last").set_checkpointing(config.checkpointing)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = poly_scheduler(self.optimizer, self.total_iterations, config.poly_power)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(config.amp and not config.bf16 and self.device.type == "cuda"
                                                           and not torch.cuda.is_bf16_supported()))
        self.epoch, self.global_step, self.best_miou, self.best_epoch = 0, 0, -1.0, -1
        if self.payload is not None:
            self._restore(self.payload)
        self.net = self.model
        if self.info.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.net = torch.compile(self.net)
        self.writer = None
        if self.info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir), purge_step=self.global_step if config.resume else None)
            (self.run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")

    # -- resume ------------------------------------------------------------------------------------------
    def _checked_latest(self) -> Path:
        path = self.run_dir / "latest.pkl"
        if not path.exists():
            raise TrainingError(f"--resume: {path} does not exist; start the run without --resume")
        return path

    def _resumed_config(self, config: TrainConfig, explicit: frozenset[str]) -> TrainConfig:
        """The stored run's settings, with the runtime settings given now; a changed recipe setting is refused."""
        stored = TrainConfig(**self.payload["train_state"]["config"])
        changed = sorted(k for k in explicit - RUNTIME_FIELDS if getattr(config, k) != getattr(stored, k))
        if changed:
            raise TrainingError(
                "--resume continues a run with its own settings, but these differ from the stored ones: "
                + ", ".join(f"{k}={getattr(config, k)!r} (run: {getattr(stored, k)!r})" for k in changed)
                + "; drop them, or start a new run with --overwrite or another --out")
        return replace(stored, **{k: getattr(config, k) for k in RUNTIME_FIELDS})

    def _restore(self, payload: dict) -> None:
        state = payload["train_state"]
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_miou, self.best_epoch = state["best_miou"], state["best_epoch"]
        set_rng_state(state["rng"])

    def _save(self, name: str, scores: dict | None = None) -> None:
        if not self.info.is_main:
            return
        meta = {"epoch": self.epoch, "global_step": self.global_step, "dataset": self.config.dataset,
                "base_size": self.config.base_size, "scores": scores or {}, "best_miou": self.best_miou,
                "best_epoch": self.best_epoch}
        train_state = {"config": asdict(self.config), "optimizer": self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                       "epoch": self.epoch, "global_step": self.global_step, "best_miou": self.best_miou,
                       "best_epoch": self.best_epoch, "rng": rng_state()}
        extra = {"train_state": train_state} if name == "latest.pkl" else {"train_config": asdict(self.config)}
        save_checkpoint(self.run_dir / name, self.model, meta=meta, **extra)

    # -- logging -----------------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if not self.info.is_main:
            return
        tqdm.write(line)
        with open(self.run_dir / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _write_pictures(self, vis: dict[int, np.ndarray]) -> None:
        if self.writer is None or not vis:
            return
        rows = []
        for i, logits in vis.items():
            item = self.data.val[i]
            rows.append(torch.cat([item["image"], item["mask"], torch.sigmoid(torch.from_numpy(logits))[None]], dim=2))
        self.writer.add_images("val/image_mask_prediction", torch.stack(rows), self.global_step)

    # -- training ----------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        # the folded inference module: the model's eval-mode outputs to rounding, in less time and memory
        net = optimize_for_inference(self.model, bf16=self.config.bf16)
        scores, vis = evaluate(net, self.data.val, self.config, self.device, self.info)
        improved = scores["mIoU"] > self.best_miou
        if improved:
            self.best_miou, self.best_epoch = scores["mIoU"], self.epoch
            self._save("best.pkl", scores)
        if self.writer is not None:
            for key, value in scores.items():
                self.writer.add_scalar(f"val/{key}", value, self.global_step)
            self._write_pictures(vis)
        self.log(f"Epoch {self.epoch:03d}/{self.config.epochs} iter {self.global_step} - "
                 + ", ".join(f"{k} {v:.4f}" if k != "Fa" else f"Fa {v * 1e6:.2f}e-6" for k, v in scores.items())
                 + f" - best mIoU {self.best_miou:.4f} (epoch {self.best_epoch})" + (" *" if improved else ""))
        return scores

    def train_one_epoch(self, progress) -> dict[str, float]:
        config, device = self.config, self.device
        self.net.train()
        loader = make_loader(self.data.train, config, train=True, epoch=self.epoch, info=self.info, device=device)
        sums: dict[str, float] = {}
        for step, batch in enumerate(loader, 1):
            image = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            with autocast_context(config, device):
                D, T = self.net(image)
            loss, parts = dconet_loss(D, T, image, mask, config.mse_weight)
            self._check_finite(loss, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            if self.writer is not None:
                for key, value in parts.items():
                    self.writer.add_scalar(f"train/{key}", value, self.global_step)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if config.save_iter_step and self.global_step % config.save_iter_step == 0 and step < len(loader):
                self.validate()
                self.net.train()
        return {key: value / max(len(loader), 1) for key, value in sums.items()}

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=self.device)
        if self.info.enabled:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at epoch {self.epoch + 1}, iteration {step}; the run stops here and "
                f"{self.run_dir / 'latest.pkl'} keeps the last good state. Lower --lr or turn off --amp/--bf16, "
                f"then continue with --resume or start again with --overwrite")

    def fit(self) -> dict:
        config = self.config
        if self.info.is_main:
            print("DCONet training configuration:\n" + json.dumps(asdict(config), indent=1))
            for part in ("train", "val"):
                print(f"  {part}: {getattr(self.data, part).describe()}")
            print(f"  device {self.device} ({self.malloc}), {self.info.world_size} process(es), {self.iters_per_epoch} "
                  f"iterations per epoch, {self.total_iterations} in all; writing to {self.run_dir}")
            if config.resume:
                self.log(f"resumed after epoch {self.epoch} (iteration {self.global_step})")
            else:
                self.log("start: " + json.dumps(asdict(config)))
        progress = tqdm(total=self.total_iterations, initial=self.global_step, unit="it", dynamic_ncols=True,
                        disable=not self.info.is_main or None)
        try:
            while self.epoch < config.epochs:
                progress.set_description(f"epoch {self.epoch + 1}/{config.epochs}")
                losses = self.train_one_epoch(progress)
                self.epoch += 1
                self.log(f"Epoch {self.epoch:03d}/{config.epochs} - "
                         + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
                         + f" - lr {self.optimizer.param_groups[0]['lr']:.3e}")
                self.validate()
                self._save("latest.pkl")
                dist_utils.barrier(self.info)
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
        summary = {"best_mIoU": self.best_miou, "best_epoch": self.best_epoch, "epochs": self.epoch,
                   "run_dir": str(self.run_dir)}
        if self.info.is_main:
            self.log(f"done: best mIoU {self.best_miou:.4f} at epoch {self.best_epoch}; weights in {self.run_dir}")
        return summary

    def close(self) -> None:
        dist_utils.cleanup(self.info)


# The built-in synthetic set that --dataset demo writes and trains on.
DEMO_DATA = dict(n_trainval=256, n_test=64, size=64)


def fit(config: TrainConfig, explicit: frozenset[str] = frozenset()) -> dict:
    """Train as ``config`` says; returns a summary (best mIoU, its epoch, the run folder)."""
    run = Run(config, explicit)
    try:
        return run.fit()
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    config, given = parse_command_line(argv)
    try:
        fit(config, given)
    except (TrainingError, DatasetError, CheckpointError, FileExistsError) as error:
        print(f"run_0.py: {error}", file=sys.stderr)
        return 1 if isinstance(error, NonFiniteLossError) else 2
    except KeyboardInterrupt:
        print("run_0.py: interrupted; continue with --resume (latest.pkl holds the last finished epoch)",
              file=sys.stderr)
        return 130
    return 0
