"""The training engine: one epoch of the release's recipe, and validation, as free functions returning dicts.

    model, optimizer, scaler = training_parts(config, device)     # as the trainer builds them
    stats = train_one_epoch(net, loader, optimizer, scheduler, device=device, on_step=log_step)
    scores = evaluate(deploy(model), val_set, device=device)   # {"mIoU": ..., "Pd": ..., ...}

Bookkeeping (run folders, checkpoints, logs, resume) is ``utils.train.run_dir``'s; the loop over epochs ``utils.train.loop``'s.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from model import DCONet, DCONetConfig, load_model
from utils.io import runtime
from utils.train import distributed as dist_utils
from utils.train.config import TrainConfig
from utils.data.datasets import target_pixels
from utils.train.losses import dconet_loss
from utils.train.run_dir import NonFiniteLoss
from utils.score.metrics import Evaluator
from utils.score.protocols import PRESETS
from utils.score.components import components
from utils.io.images import pad_to_multiple, padded_size

# In-training validation, as the release's: pixels with T > 0 against the pixels at the mask's maximum, at the
# training size, summed over the set (mIoU); the other scores by the standard protocol's rules.
VALIDATION = replace(PRESETS["standard"], name="validation", seg_score="logit", seg_threshold=0.0,
                     det_score="logit", det_threshold=0.0)


def autocast_context(device: torch.device, bf16: bool = False, amp: bool = False, amp_dtype: str = "auto"):
    """bf16 autocast (``bf16``, CPU or CUDA), GPU mixed precision (``amp`` where ``runtime.gpu_paths``, dtype per
    ``runtime.amp_dtype``), or nothing."""
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp and runtime.gpu_paths(device):
        return torch.autocast(device.type, dtype=runtime.amp_dtype(device, amp_dtype))
    return nullcontext()


def training_parts(config: TrainConfig, device: torch.device) -> tuple[DCONet, torch.optim.Adam,
                                                                        torch.amp.GradScaler]:
    """The model, its optimizer and the loss scaler that ``config`` trains with on ``device``: the model in its
    layout, checkpointing and kernels; Adam, on a GPU (``runtime.gpu_paths``) the fused one (the same update in one
    kernel launch instead of several per parameter); a GradScaler, enabled where --amp computes in float16."""
    model = DCONet(config.model).to(device)
    model.set_channels_last(config.memory_format == "channels_last").set_checkpointing(config.checkpointing)
    model.use_kernels(config.kernels == "fast")
    gpu = runtime.gpu_paths(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=True if gpu else None)
    fp16 = (config.amp and not config.runtime.bf16 and gpu
            and runtime.amp_dtype(device, config.amp_dtype) == torch.float16)
    return model, optimizer, torch.amp.GradScaler(device.type, enabled=fp16)


def initial_weights(path: str) -> dict:
    """What ``--init`` starts from: ``{"config": the model's settings, "model": its state_dict, "kind": "project"
    or "release"}``, read from one of this project's checkpoints or an authors' best.pkl (``load_model``)."""
    model, info = load_model(path)
    return {"config": info["config"], "model": model.state_dict(), "kind": info["kind"]}


def with_initial_model(config: TrainConfig, stored: dict, given: frozenset[str]) -> TrainConfig:
    """``config`` with the model settings (K, width) of the ``--init`` weights; a K or width given on the command
    line that differs from them is an error."""
    stored = DCONetConfig.from_dict(stored)
    if stored == config.model:
        return config
    asked = {name: getattr(config.model, name) for name in ("stage_num", "channels") if name in given}
    if any(getattr(stored, name) != value for name, value in asked.items()):
        raise ValueError(f"--init {config.init} holds a DCONet with K = {stored.stage_num} and width "
                         f"{stored.channels}, but the command line asks for "
                         f"{', '.join(f'{k} = {v}' for k, v in asked.items())}: drop --stage-num/--channels to "
                         f"train the file's model, or leave out --init to start from random weights")
    return replace(config, model=stored)


def load_initial_weights(model: DCONet, init: dict, config: TrainConfig) -> str:
    """Load ``initial_weights``' state into ``model``; returns the note for the log."""
    model.load_state_dict(init["model"])
    return (f"--init: starting from the weights of {config.init} ({init['kind']} checkpoint, K = "
            f"{config.model.stage_num}, width {config.model.channels})")


PARTS = ("loss", "soft_iou", "mse")     # the loss parts, in the order the engine stacks them ("bce" after them
                                        # when the loss has it: ``loss_parts``)


def loss_parts(bce_weight: float = 0.0) -> tuple[str, ...]:
    """The parts ``dconet_loss`` returns at this ``bce_weight``, in the order the engine stacks them."""
    return (*PARTS, "bce") if bce_weight else PARTS


def describe_parts(parts: dict[str, float]) -> str:
    """A log line's loss: ``loss 1.0100 (soft_iou 0.9993, mse 0.10777)``, with ``, bce 0.00123`` when present."""
    bce = f", bce {parts['bce']:.5f}" if "bce" in parts else ""
    return f"loss {parts['loss']:.4f} (soft_iou {parts['soft_iou']:.4f}, mse {parts['mse']:.5f}{bce})"


def _all_finite(loss: torch.Tensor, info: dist_utils.DistInfo) -> bool:
    """Whether the loss is finite on every rank; reads it (the CPU's per-step check)."""
    bad = torch.logical_not(torch.isfinite(loss)).to(torch.float32).reshape(1)
    if info.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bad.item()


def read_parts(pending: list[tuple[int, torch.Tensor, float]], info: dist_utils.DistInfo,
               keys: tuple[str, ...] = PARTS) -> list[tuple[int, dict[str, float]]]:
    """The pending steps' loss parts as floats, averaged over the ranks: one all-reduce and one copy to the host
    for them all. ``pending``: (step, parts stacked as ``keys`` (P,), lr used), emptied. Raises
    ``NonFiniteLoss`` (on every rank) at the first step whose loss is not finite."""
    rows = dist_utils.mean_over_ranks(info, torch.stack([row for _, row, _ in pending])).cpu()   # (S, P)
    finite = torch.isfinite(rows).all(dim=1).tolist()
    out = []
    for (step, _, lr), values, ok in zip(pending, rows.tolist(), finite):
        if not ok:
            raise NonFiniteLoss(values[0], step)
        out.append((step, {**dict(zip(keys, values)), "lr": lr}))
    pending.clear()
    return out


def train_one_epoch(net: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None, mse_weight: float = 0.1, bce_weight: float = 0.0,
                    autocast: Callable = nullcontext, info: dist_utils.DistInfo = dist_utils.DistInfo(),
                    on_step: Callable[[int, dict], None] | None = None,
                    after_update: Callable[[], None] | None = None,
                    read_at: Callable[[int], bool] | None = None,
                    check_each_step: bool | None = None) -> dict[str, float]:
    """One pass over ``loader``: loss = SoftIoU(T, mask) + mse_weight * MSE(D, image) (+ bce_weight * BCE(T,
    mask), ``dconet_loss``), Adam step, poly step.

    The loss parts stay on the device until they are read: after the steps ``read_at(step)`` names (log lines,
    validations; every step when None) and at the epoch's end, all pending steps at once, so that the host
    queues work ahead of a GPU. Each read calls ``on_step(step, parts)`` for every step read, in order (step
    1-based; the parts averaged over the ranks, with ``lr``, the learning rate that iteration used). A
    non-finite loss raises ``NonFiniteLoss`` (on every rank): with ``check_each_step`` (None: off the GPU paths,
    on the CPU, where reading costs nothing) before it reaches the weights, else at the next read.
    ``after_update()`` runs after every optimizer step (a moving average of the weights, say). Returns the
    epoch's mean loss parts (``loss_parts(bce_weight)``), the last ``lr`` used and ``iterations``.
    """
    net.train()
    keys = loss_parts(bce_weight)
    sums = dict.fromkeys(keys, 0.0)
    lr = optimizer.param_groups[0]["lr"]
    steps = 0
    pending: list[tuple[int, torch.Tensor, float]] = []
    if check_each_step is None:
        check_each_step = not runtime.gpu_paths(device)

    def read() -> None:
        for step, parts in read_parts(pending, info, keys):
            for key in keys:
                sums[key] += parts[key]
            if on_step is not None:
                on_step(step, parts)

    for steps, batch in enumerate(loader, 1):
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with autocast():
            D, T = net(image)
        loss, parts = dconet_loss(D, T, image, mask, mse_weight, bce_weight)
        if check_each_step and not _all_finite(loss, info):
            raise NonFiniteLoss(loss.item(), steps)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_update is not None:
            after_update()
        scheduler.step()
        pending.append((steps, torch.stack([parts[key] for key in keys]), lr))
        if read_at is None or read_at(steps):
            read()
    if pending:
        read()
    return {**{key: value / max(steps, 1) for key, value in sums.items()}, "lr": lr, "iterations": steps}


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, dataset, indices: list[int], *, device: torch.device,
                   batch_size: int = 8, autocast: Callable = nullcontext) -> dict[int, np.ndarray]:
    """Target logits T (H, W) float32 of the given samples of ``dataset``, keyed by index, in eval mode. Images of
    any size: each is reflect-padded to multiples of 32 and its T cropped back (native geometry); images of one
    padded size share batches."""
    model.eval()
    images = {i: dataset[i]["image"][0].numpy() for i in indices}
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        by_size.setdefault(padded_size(*images[i].shape), []).append(i)
    out: dict[int, np.ndarray] = {}
    for same in by_size.values():
        for start in range(0, len(same), batch_size):
            chunk = same[start:start + batch_size]
            batch = torch.from_numpy(np.stack([pad_to_multiple(images[i]) for i in chunk]))[:, None].to(device)
            with autocast():
                _, T = model(batch)
            for i, t in zip(chunk, T.float().cpu().numpy()):
                h, w = images[i].shape
                out[i] = t[0, :h, :w]
    return out


def prediction_pictures(model: torch.nn.Module, dataset, indices: list[int], *, device: torch.device) -> torch.Tensor:
    """(N, 1, H, 3W) rows of image | mask | sigmoid(T) of the given samples, for TensorBoard; frames of other sizes
    (native geometry) zero-padded at the bottom and right to the largest."""
    logits = predict_logits(model, dataset, indices, device=device)
    rows = [torch.cat([dataset[i]["image"], dataset[i]["mask"], torch.sigmoid(torch.from_numpy(logits[i]))[None]],
                      dim=2) for i in indices]
    h, w = max(r.shape[1] for r in rows), max(r.shape[2] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, w - r.shape[2], 0, h - r.shape[1])) for r in rows])


def evaluate(model: torch.nn.Module, dataset, *, device: torch.device, batch_size: int = 8,
             autocast: Callable = nullcontext, info: dist_utils.DistInfo = dist_utils.DistInfo()) -> dict[str, float]:
    """``VALIDATION`` scores of ``model`` on ``dataset`` (each rank predicts its share, rank 0 scores them all,
    every rank gets the scores): {"mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1", "AUC"}."""
    shard = list(range(info.rank, len(dataset), info.world_size))
    logits = predict_logits(model, dataset, shard, device=device, batch_size=batch_size, autocast=autocast)
    gathered = dist_utils.gather_objects(info, logits)
    scores = None
    if info.is_main:
        merged = {i: t for part in gathered for i, t in part.items()}
        evaluator = Evaluator(VALIDATION)
        for i in range(len(dataset)):
            item = dataset[i]
            evaluator.update(merged[i], target_pixels(item["mask"][0].numpy()), name=item["stem"])
        scores = evaluator.compute()
    return dist_utils.broadcast_object(info, scores)


def false_targets(model: torch.nn.Module, frames, *, device: torch.device, batch_size: int = 8,
                  info: dist_utils.DistInfo = dist_utils.DistInfo()) -> dict[str, float]:
    """Targets raised on frames that hold none (``utils.data.negatives``, each as a validation sample at the
    validation geometry): every 8-connected component of T > 0 is a false target. Returns {"FT/frame": false
    targets per frame, "FT-frames": the fraction of frames with at least one}."""
    shard = list(range(info.rank, len(frames), info.world_size))
    logits = predict_logits(model, frames, shard, device=device, batch_size=batch_size)
    counts = [n for part in dist_utils.gather_objects(info, {i: components(t > 0).n for i, t in logits.items()})
              for n in part.values()]
    return false_target_rates(counts)


def false_target_rates(counts: list[int]) -> dict[str, float]:
    """{"FT/frame", "FT-frames"} of the false targets counted on each frame without a target."""
    total = max(len(counts), 1)
    return {"FT/frame": sum(counts) / total, "FT-frames": sum(c > 0 for c in counts) / total}
