"""Training DCONet with the release's recipe: the loop over epochs, on one process or under torchrun.

    trainer = Trainer(config)          # data, model, optimizer, schedule; resumes when config.resume
    summary = trainer.fit()            # {"best_mIoU", "best_epoch", "best_step", "epochs", "run_dir"}

One epoch and validation are ``utils.train.engine``'s free functions; the run folder, checkpoints and logs are
``utils.train.run_dir``'s. Validation runs after every ``save_iter_step`` iterations and after every epoch, as the
release's run does; best.pkl keeps the best of them (the last with ``--keep last``); each redraws the run's
curves.png from its log.txt (``utils.train.curves``). With ``--ema`` the validations, best.pkl and the export use
a moving average of the weights (``utils.train.ema``; BatchNorm statistics the trained module's), which latest.pkl
keeps for resuming.
"""
from __future__ import annotations

import json
import time

import torch
from tqdm import tqdm

from model import deploy, load_checkpoint
from model.batchnorm import synchronise_batchnorm
from utils.train import distributed as dist_utils
from utils.train.config import TrainConfig
from utils.train.ema import WeightAverage
from utils.train.engine import (autocast_context, describe_parts, evaluate, false_targets, initial_weights,
                                load_initial_weights, loss_parts, prediction_pictures, train_one_epoch,
                                training_parts, with_initial_model)
from utils.train.layout import set_memory_format
from utils.train.run_data import run_data
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
            # read by rank 0, whose node holds the run folder, and sent to every rank: other nodes need no copy
            payload = dist_utils.read_on_main(self.info, lambda: load_checkpoint(self.run_dir / "latest.pkl"))
            config = resumed_config(config, TrainConfig.from_dict(payload["train_state"]["config"]), given)
        init = None
        if config.init and payload is None:         # a resumed run has its own weights
            init = dist_utils.read_on_main(self.info, lambda: initial_weights(config.init))
            config = with_initial_model(config, init["config"], given)
        self.config = config
        seed_everything(config.seed)
        if config.dataset == "demo" and self.info.is_node_main:     # every node writes its own (the same) set
            ensure_demo_dataset(config.data_root)
        dist_utils.barrier(self.info)
        self.data, self.negatives, self.notes = run_data(config)    # negatives: held out, or None
        self.loader = make_loader(self.data.train, config, train=True, epoch=0, info=self.info, device=self.device)
        self.iters_per_epoch = len(self.loader)
        self.total_iterations = config.epochs * self.iters_per_epoch     # of the run; a resumed one may differ

        self.model, self.optimizer, self.scaler = training_parts(config, self.device)
        side = config.crop_size or config.base_size       # the training batch's shape, for --memory-format auto
        self.notes += set_memory_format(self.model, config.memory_format, (config.batch_size, 1, side, side), self.info)
        self.scheduler = poly_scheduler(self.optimizer, self.total_iterations, config.poly_power)
        if init is not None:
            self.notes.append(load_initial_weights(self.model, init, config))
        self.progress = {"epoch": 0, "global_step": 0, "best_miou": -1.0, "best_epoch": -1, "best_step": -1}
        # the moving average of the weights, of the plain module (before SyncBN or DDP); its BatchNorm statistics
        # are the trained module's (``WeightAverage`` says why)
        self.ema = WeightAverage(self.model, config.ema) if config.ema else None
        if payload is not None:
            self._restore(payload)
        if config.sync_bn and self.info.enabled:
            synchronise_batchnorm(self.model)       # every BatchNorm, MDCR's shared one included; the same tensors
        elif config.sync_bn:
            self.notes.append("--sync-bn changes nothing in a single process (it acts under torchrun)")
        self.net = self.model
        if self.info.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.runtime.compile:
            self.net = torch.compile(self.net)
            # the batch size a variable of the compiled graph from the start: the epoch's last, smaller batch
            # (drop_last is off, as in the release) then runs the same graph instead of compiling another
            self.net.register_forward_pre_hook(lambda _, inputs: torch._dynamo.maybe_mark_dynamic(inputs[0], 0))
        # TensorBoard drops what earlier attempts logged from this iteration on (their files are kept)
        self.log = RunLog(self.run_dir, enabled=self.info.is_main, purge_step=self.progress["global_step"])
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
        self._continue_schedule(state["config"]["epochs"], state.get("world_size"))

    def _continue_schedule(self, stored_epochs: int, stored_world_size: int | None) -> None:
        """The schedule of a run resumed after ``progress["epoch"]`` epochs: its count is the fraction of the run
        done in this run's iterations (epochs done x iterations per epoch; a run saved by another number of
        processes counted others, and a note says so). The log's count (``global_step``) goes on as it was."""
        done, p = self.progress["epoch"], self.progress
        if self.config.epochs < done:
            raise TrainingError(f"--epochs {self.config.epochs}: {self.run_dir} has already trained {done} epochs; "
                                f"give a total of {done} or more (the run's own is {stored_epochs})")
        stored_count, count = self.scheduler.last_epoch, done * self.iters_per_epoch
        lr = continue_schedule(self.scheduler, count)
        self.total_iterations = p["global_step"] + (self.config.epochs - done) * self.iters_per_epoch
        if count != stored_count:
            saved_by = f"{stored_world_size} process(es)" if stored_world_size else "an earlier version"
            self.notes.append(f"{stored_count // done} -> {self.iters_per_epoch} iterations per epoch (saved by "
                              f"{saved_by}, resumed by {self.info.world_size}): the poly schedule continues from the "
                              f"same point of the run, epoch {done} of {self.config.epochs}, its count rescaled "
                              f"{stored_count} -> {count} of {self.config.epochs * self.iters_per_epoch} (lr {lr:.3e} "
                              f"now); the log counts on from iteration {p['global_step']}, {self.total_iterations} in "
                              f"all")
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
                            "scaler": self.scaler.state_dict(), "world_size": self.info.world_size}, self.model
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
        save_run_checkpoint(self.run_dir / name, model, self.config, dict(self.progress), scores, state)

    # -- validation --------------------------------------------------------------------------------------
    def validate(self, epoch: int, epoch_end: bool = False) -> dict[str, float]:
        """Scores on the val split (the folded inference module: the model's eval outputs to rounding); a new
        best mIoU writes best.pkl. ``epoch``: the (1-based) epoch this validation happens in; at the end of every
        ``negative_val_every``-th epoch (``epoch_end``) and of the last, also false targets per frame on the
        held-out negatives."""
        dist_utils.broadcast_buffers(self.info, self.model)     # every rank validates (and saves) rank 0's model
        if self.ema is not None:
            dist_utils.broadcast_buffers(self.info, self.ema.module)
        net = deploy(self.validated(), bf16=self.config.runtime.bf16)
        scores = evaluate(net, self.data.val, device=self.device, batch_size=self.config.batch_size, info=self.info)
        every = self.config.negative_val_every
        if self.negatives is not None and epoch_end and (epoch % every == 0 or epoch == self.config.epochs):
            scores.update(false_targets(net, self.negatives, device=self.device, batch_size=self.config.batch_size,
                                        info=self.info))
        p = self.progress
        improved = scores["mIoU"] > p["best_miou"]
        if improved:
            p.update(best_miou=scores["mIoU"], best_epoch=epoch, best_step=p["global_step"])
        if improved or self.config.keep == "last":
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
        self._new_memory_window()                               # the next log line's peak is training's
        return scores

    def _pictures(self, net) -> None:
        shown = list(range(min(self.config.vis_images, len(self.data.val))))
        if shown:
            pictures = prediction_pictures(net, self.data.val, shown, device=self.device)
            self.log.images("val/image_mask_prediction", pictures, self.progress["global_step"])

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
                         f"{p['global_step']}/{self.total_iterations}) - {describe_parts(parts)} - lr "
                         f"{parts['lr']:.3e} - {rate:.3f} it/s - left: epoch {format_duration(left_epoch)}, run "
                         f"{format_duration(left_run)}" + self._gpu_memory())
            if (config.save_iter_step and p["global_step"] % config.save_iter_step == 0
                    and step < self.iters_per_epoch):
                self.validate(epoch)
                self.net.train()
        return on_step

    def _after_update(self):
        if self.ema is None:
            return None
        return lambda: self.ema.update(self.model)

    def _gpu_memory(self) -> str:
        """For a log line: the GPU memory peak since the last line, validation or start; a new window starts."""
        if self.device.type != "cuda":
            return ""
        peak = torch.cuda.max_memory_allocated(self.device)
        self._new_memory_window()
        return f" - GPU memory peak {peak / 2**30:.2f} GiB"

    def _new_memory_window(self) -> None:
        """Start the window whose GPU memory peak the next log line reports."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def fit(self) -> dict:
        config, p = self.config, self.progress
        if self.info.is_main:
            print("DCONet training:")
            held_out = [("held-out", self.negatives)] if self.negatives is not None else []
            for part, data in [("train", self.data.train), ("val", self.data.val)] + held_out:
                print(f"  {part}: {data.describe()}")
            print(f"  device {self.device} ({self.malloc}), {self.info.world_size} process(es), "
                  f"{self.iters_per_epoch} iterations per epoch, {self.total_iterations} in all; writing to "
                  f"{self.run_dir}", flush=True)
        self.log(f"resumed after epoch {p['epoch']} (iteration {p['global_step']})" if config.resume
                 else "start: " + json.dumps(config.to_dict()))
        for note in self.notes:
            self.log(f"note: {note}")
        bar = tqdm(total=self.total_iterations, initial=p["global_step"], unit="it", dynamic_ncols=True,
                   disable=None if self.info.is_main else True)     # None: a bar on terminals only
        clock = {"t0": time.perf_counter(), "step0": p["global_step"]}
        self._new_memory_window()
        epoch, saved = p["epoch"] + 1, p["epoch"]            # saved: the epoch latest.pkl holds
        try:
            while p["epoch"] < config.epochs:
                epoch = p["epoch"] + 1
                bar.set_description(f"epoch {epoch}/{config.epochs}")
                set_loader_epoch(self.loader, p["epoch"])
                try:
                    stats = train_one_epoch(self.net, self.loader, self.optimizer, self.scheduler, device=self.device,
                                            scaler=self.scaler, mse_weight=config.mse_weight,
                                            bce_weight=config.bce_weight, info=self.info,
                                            autocast=lambda: autocast_context(self.device, config.runtime.bf16,
                                                                              config.amp, config.amp_dtype),
                                            on_step=self._on_step(epoch, bar, clock),
                                            after_update=self._after_update(), read_at=self._read_at(p["global_step"]))
                except NonFiniteLoss as error:
                    raise error.at(epoch, self.run_dir)
                p["epoch"] = epoch
                losses = ", ".join(f"{k} {stats[k]:.4f}" for k in loss_parts(config.bce_weight))
                self.log(f"epoch {epoch}/{config.epochs} done - {losses} - lr {stats['lr']:.3e} (last used)")
                self.validate(epoch, epoch_end=True)
                self._save("latest.pkl")
                saved = epoch
                dist_utils.barrier(self.info)
        except KeyboardInterrupt:
            self.log(f"interrupted in epoch {epoch}/{config.epochs} (iteration {p['global_step']} read last); "
                     + (f"latest.pkl holds epoch {saved}" if saved else "no epoch had finished"))
            raise
        finally:
            bar.close()
            self.log.close()
        kept = "; best.pkl holds the last validation's weights (--keep last)" * (config.keep == "last")
        self.log(f"done: best mIoU {p['best_miou']:.4f} at epoch {p['best_epoch']} (iteration {p['best_step']})"
                 f"{kept}; weights in {self.run_dir}")
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
