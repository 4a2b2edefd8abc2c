"""Training DCONet with the release's recipe: the loop over epochs, on one process or under torchrun.

    trainer = Trainer(config)          # data, model, optimizer, schedule; resumes when config.resume
    summary = trainer.fit()            # {"best_mIoU", "best_epoch", "best_step", "epochs", "run_dir"}

One epoch and validation are ``utils.train.engine``'s free functions; the run folder, checkpoints and logs are
``utils.train.run_dir``'s. Validation runs after every ``save_iter_step`` iterations and after every epoch, as the release's
run does, and best.pkl keeps the best of all of them; each validation redraws the run's curves.png from its
log.txt (``utils.train.curves``). With ``--ema`` the validations, best.pkl and the export use a moving average of the
weights (``AveragedModel``; BatchNorm statistics the trained module's), which latest.pkl keeps for resuming.
"""
from __future__ import annotations

import json
import time
import warnings

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model import deploy, load_checkpoint
from utils.train import distributed as dist_utils
from utils.train.config import TrainConfig
from utils.data.datasets import build_datasets
from utils.data.splits import DatasetWarning
from utils.train.engine import autocast_context, evaluate, predict_logits, train_one_epoch, training_parts
from utils.train.run_dir import (NonFiniteLoss, RunLog, TrainingError, format_duration, prepare_run_dir, remove_if_empty, resumed_config,
                       save_run_checkpoint, seed_everything, set_rng_state)
from utils.io.runtime import resolve_device
from utils.train.schedule import continue_schedule, poly_scheduler
from utils.data.synthetic_sets import ensure_demo_dataset
from utils.train.curves import refresh_run_curves
from utils.train.loader import make_loader, set_loader_epoch


class Trainer:
    """One training run: its data, model, optimizer and schedule, and the progress a checkpoint keeps."""

    def __init__(self, config: TrainConfig, given: frozenset[str] = frozenset()):
        device = resolve_device(config.runtime.device)
        self.info = dist_utils.init_distributed(device.type)
        if device.type == "cuda" and self.info.enabled:
            device = torch.device("cuda", self.info.local_rank)
        self.device, self.malloc = config.runtime.setup(fixed_sizes=True, device=device)
        self.run_dir, created = config.run_dir(), False
        if self.info.is_main:
            self.run_dir, created = prepare_run_dir(config)
        dist_utils.barrier(self.info)
        try:
            self._set_up(config, given)
        except BaseException:
            if created:
                remove_if_empty(self.run_dir)
            raise

    def _set_up(self, config: TrainConfig, given: frozenset[str]) -> None:
        payload = None
        if config.resume:
            payload = load_checkpoint(self.run_dir / "latest.pkl", map_location="cpu")
            config = resumed_config(config, TrainConfig.from_dict(payload["train_state"]["config"]), given)
        self.config = config
        seed_everything(config.seed)
        if config.dataset == "demo" and self.info.is_main:
            ensure_demo_dataset(config.data_root)
        dist_utils.barrier(self.info)
        with warnings.catch_warnings(record=True) as caught:     # tolerated data problems go to the log
            warnings.simplefilter("always", DatasetWarning)
            self.data = build_datasets(config.data_root, config.dataset, base_size=config.base_size,
                                       augment=config.augment_enabled(), crop_size=config.crop_size or None,
                                       val_split=config.val_split, seed=config.seed,
                                       mask_resampling=config.mask_resampling)
        self.notes = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
        for other in (w for w in caught if not issubclass(w.category, DatasetWarning)):
            warnings.warn(other.message, other.category)
        self.loader = make_loader(self.data.train, config, train=True, epoch=0, info=self.info, device=self.device)
        self.iters_per_epoch = len(self.loader)
        self.total_iterations = config.epochs * self.iters_per_epoch

        self.model, self.optimizer, self.scaler = training_parts(config, self.device)
        self.scheduler = poly_scheduler(self.optimizer, self.total_iterations, config.poly_power)
        self.progress = {"epoch": 0, "global_step": 0, "best_miou": -1.0, "best_epoch": -1, "best_step": -1}
        # the moving average of the weights, of the plain module (before SyncBN or DDP). Its BatchNorm statistics
        # are the trained module's, copied at each update: averaged statistics lag behind activations whose scale
        # grows fast early on, and a model with them marked nothing on NUAA-SIRST for 350 iterations (mIoU 0
        # where the averaged weights with the current statistics scored 0.57).
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=False)
                    if config.ema else None)
        if payload is not None:
            self._restore(payload)
        if config.sync_bn and self.info.enabled:
            if self.device.type != "cuda":
                raise ValueError("--sync-bn needs GPUs (SyncBatchNorm runs on CUDA only); leave it out on the CPU")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif config.sync_bn:
            self.notes.append("--sync-bn changes nothing in a single process (it acts under torchrun)")
        self.net = self.model
        if self.info.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.runtime.compile:
            self.net = torch.compile(self.net)
        self.log = RunLog(self.run_dir, enabled=self.info.is_main,
                          purge_step=self.progress["global_step"] if config.resume else None)
        self.log.write_config(config)

    def _restore(self, payload: dict) -> None:
        state = payload["train_state"]
        self.model.load_state_dict(payload["model"])
        fused = self.optimizer.param_groups[0]["fused"]      # this device's choice, not the saving run's
        saved = {**state["optimizer"], "param_groups": [{**group, "fused": fused}
                                                        for group in state["optimizer"]["param_groups"]]}
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.progress.update({key: state.get(key, self.progress[key]) for key in self.progress})
        set_rng_state(state["rng"])
        self._continue_schedule(state["config"]["epochs"])

    def _continue_schedule(self, stored_epochs: int) -> None:
        done = self.progress["epoch"]
        if self.config.epochs < done:
            raise TrainingError(f"--epochs {self.config.epochs}: {self.run_dir} has already trained {done} epochs; "
                                f"give a total of {done} or more (the run's own is {stored_epochs})")
        lr = continue_schedule(self.scheduler)
        if self.config.epochs != stored_epochs:
            self.notes.append(f"epochs {stored_epochs} -> {self.config.epochs}: the poly schedule continues over "
                              f"{self.total_iterations} iterations from iteration {self.progress['global_step']} "
                              f"(lr {lr:.3e} now)")

    def validated(self) -> torch.nn.Module:
        """The module that validation scores and best.pkl holds: the weights' moving average with ``--ema``,
        else the trained module itself."""
        return self.ema.module if self.ema is not None else self.model

    def _save(self, name: str, scores: dict | None = None) -> None:
        if not self.info.is_main:
            return
        state, model = None, self.validated()
        if name == "latest.pkl":
            state, model = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "scaler": self.scaler.state_dict()}, self.model
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
        save_run_checkpoint(self.run_dir / name, model, self.config, dict(self.progress), scores, state)

    # -- validation --------------------------------------------------------------------------------------
    def validate(self, epoch: int) -> dict[str, float]:
        """Scores on the val split (the folded inference module: the model's eval outputs to rounding); a new
        best mIoU writes best.pkl. ``epoch``: the (1-based) epoch this validation happens in."""
        dist_utils.broadcast_buffers(self.info, self.model)     # every rank validates (and saves) rank 0's model
        if self.ema is not None:
            dist_utils.broadcast_buffers(self.info, self.ema.module)
        net = deploy(self.validated(), bf16=self.config.runtime.bf16)
        scores = evaluate(net, self.data.val, device=self.device, batch_size=self.config.batch_size, info=self.info)
        p = self.progress
        improved = scores["mIoU"] > p["best_miou"]
        if improved:
            p.update(best_miou=scores["mIoU"], best_epoch=epoch, best_step=p["global_step"])
            self._save("best.pkl", scores)
        if self.info.is_main:
            self.log.scalars("val", scores, p["global_step"])
            self._pictures(net)
        self.log(f"validation epoch {epoch}/{self.config.epochs} iter {p['global_step']} - "
                 + ", ".join(f"{k} {v:.4f}" if k != "Fa" else f"Fa {v:.2e}" for k, v in scores.items())
                 + f" - best mIoU {p['best_miou']:.4f} (epoch {p['best_epoch']}, iter {p['best_step']})"
                 + (" *" if improved else ""))
        if self.info.is_main:
            refresh_run_curves(self.run_dir, note=self.log)     # curves.png; a failure is only noted in the log
        return scores

    def _pictures(self, net) -> None:
        shown = list(range(min(self.config.vis_images, len(self.data.val))))
        if not shown:
            return
        logits = predict_logits(net, self.data.val, shown, device=self.device)
        rows = [torch.cat([self.data.val[i]["image"], self.data.val[i]["mask"],
                           torch.sigmoid(torch.from_numpy(logits[i]))[None]], dim=2) for i in shown]
        self.log.images("val/image_mask_prediction", torch.stack(rows), self.progress["global_step"])

    # -- the loop ----------------------------------------------------------------------------------------
    def _read_at(self, start: int):
        """Which steps of an epoch starting after global step ``start`` read the loss: log lines, validations."""
        config = self.config

        def read_at(step: int) -> bool:
            return bool((config.log_every and step % config.log_every == 0)
                        or (config.save_iter_step and (start + step) % config.save_iter_step == 0))
        return read_at

    def _on_step(self, epoch: int, bar, clock: dict):
        config, p = self.config, self.progress

        def on_step(step: int, parts: dict) -> None:
            p["global_step"] += 1
            if self.info.is_main:
                self.log.scalars("train", parts, p["global_step"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{parts['lr']:.2e}")
            if config.log_every and (step % config.log_every == 0 or step == self.iters_per_epoch):
                rate = (p["global_step"] - clock["step0"]) / max(time.perf_counter() - clock["t0"], 1e-9)
                left_epoch = (self.iters_per_epoch - step) / rate
                left_run = (self.total_iterations - p["global_step"]) / rate
                self.log(f"epoch {epoch}/{config.epochs} iter {step}/{self.iters_per_epoch} (total "
                         f"{p['global_step']}/{self.total_iterations}) - loss {parts['loss']:.4f} (soft_iou "
                         f"{parts['soft_iou']:.4f}, mse {parts['mse']:.5f}) - lr {parts['lr']:.3e} - "
                         f"{rate:.3f} it/s - left: epoch {format_duration(left_epoch)}, run "
                         f"{format_duration(left_run)}" + self._gpu_memory())
            if (config.save_iter_step and p["global_step"] % config.save_iter_step == 0
                    and step < self.iters_per_epoch):
                self.validate(epoch)
                self.net.train()
        return on_step

    def _after_update(self):
        if self.ema is None:
            return None
        return lambda: self.ema.update_parameters(self.model)

    def _gpu_memory(self) -> str:
        if self.device.type != "cuda":
            return ""
        return f" - GPU memory peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"

    def fit(self) -> dict:
        config, p = self.config, self.progress
        if self.info.is_main:
            print("DCONet training:")
            for part in ("train", "val"):
                print(f"  {part}: {getattr(self.data, part).describe()}")
            print(f"  device {self.device} ({self.malloc}), {self.info.world_size} process(es), "
                  f"{self.iters_per_epoch} iterations per epoch, {self.total_iterations} in all; writing to "
                  f"{self.run_dir}", flush=True)
        if config.resume:
            self.log(f"resumed after epoch {p['epoch']} (iteration {p['global_step']})")
        else:
            self.log("start: " + json.dumps(config.to_dict()))
        for note in self.notes:
            self.log(f"note: {note}")
        bar = tqdm(total=self.total_iterations, initial=p["global_step"], unit="it", dynamic_ncols=True,
                   disable=None if self.info.is_main else True)     # None: a bar on terminals only
        clock = {"t0": time.perf_counter(), "step0": p["global_step"]}
        try:
            while p["epoch"] < config.epochs:
                epoch = p["epoch"] + 1
                bar.set_description(f"epoch {epoch}/{config.epochs}")
                set_loader_epoch(self.loader, p["epoch"])
                try:
                    stats = train_one_epoch(self.net, self.loader, self.optimizer, self.scheduler, device=self.device,
                                            scaler=self.scaler, mse_weight=config.mse_weight, info=self.info,
                                            autocast=lambda: autocast_context(self.device, config.runtime.bf16,
                                                                              config.amp, config.amp_dtype),
                                            on_step=self._on_step(epoch, bar, clock),
                                            after_update=self._after_update(),
                                            read_at=self._read_at(p["global_step"]))
                except NonFiniteLoss as error:
                    raise error.at(epoch, self.run_dir)
                p["epoch"] = epoch
                losses = ", ".join(f"{k} {stats[k]:.4f}" for k in ("loss", "soft_iou", "mse"))
                self.log(f"epoch {epoch}/{config.epochs} done - {losses} - lr {stats['lr']:.3e} (last used)")
                self.validate(epoch)
                self._save("latest.pkl")
                dist_utils.barrier(self.info)
        finally:
            bar.close()
            self.log.close()
        self.log(f"done: best mIoU {p['best_miou']:.4f} at epoch {p['best_epoch']} (iteration {p['best_step']}); "
                 f"weights in {self.run_dir}")
        return {"best_mIoU": p["best_miou"], "best_epoch": p["best_epoch"], "best_step": p["best_step"],
                "epochs": p["epoch"], "run_dir": str(self.run_dir)}

    def close(self) -> None:
        dist_utils.cleanup(self.info)


def fit(config: TrainConfig, given: frozenset[str] = frozenset()) -> dict:
    """Train as ``config`` says; returns a summary (best mIoU, its epoch and iteration, the run folder)."""
    trainer = Trainer(config, given)
    try:
        return trainer.fit()
    finally:
        trainer.close()
