"""An exponential moving average of a model's weights (``--ema``), updated after every optimizer step.

    average = WeightAverage(model, decay=0.99)    # a copy of the model: its weights start as the model's
    average.update(model)                         # after each step: w_avg <- w_avg + (1 - decay) (w - w_avg)
    average.module                                # the averaged model (validation, best.pkl, export)

Only the parameters are averaged; the BatchNorm statistics (buffers) are copied from the trained model at each
update. Averaged statistics lag behind activations whose scale grows fast early on, and a model with them marked
nothing on NUAA-SIRST for 350 iterations (mIoU 0 where the averaged weights with the current statistics scored
0.57). This is what ``torch.optim.swa_utils.AveragedModel(model, get_ema_multi_avg_fn(decay),
use_buffers=False)`` computes, in two multi-tensor operations per update (one lerp of all parameters, one copy of
all buffers) and without reading anything from the device: the update count is a Python int, where
AveragedModel keeps a CPU tensor that it compares and copies to the model's device at every update. The state
dict is AveragedModel's (``module.<name>`` and ``n_averaged``), so checkpoints of either load into the other.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """Exponential moving average of ``model``'s parameters with the given ``decay`` (in [0, 1)); buffers are
    the model's own, copied at each ``update``. ``module`` is the averaged copy of the model."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the decay of a moving average must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0            # how many times update() ran: a host number, never read from the device
        self._averaged = list(self.module.parameters())
        self._kept = list(self.module.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s parameters (the first update copies them) and take its buffers."""
        parameters, buffers = list(model.parameters()), list(model.buffers())
        if len(parameters) != len(self._averaged) or len(buffers) != len(self._kept):
            raise ValueError(f"the model has {len(parameters)} parameters and {len(buffers)} buffers, its average "
                             f"{len(self._averaged)} and {len(self._kept)}: average the model it was made from")
        if self.updates == 0:
            torch._foreach_copy_(self._averaged, parameters)
        else:
            torch._foreach_lerp_(self._averaged, parameters, 1.0 - self.decay)
        if buffers:
            torch._foreach_copy_(self._kept, buffers)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AveragedModel's layout: the averaged module's state as ``module.<name>``, the update count as
        ``n_averaged`` (a 0-d int64 tensor)."""
        state = {f"module.{key}": value for key, value in self.module.state_dict().items()}
        state["n_averaged"] = torch.tensor(self.updates, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Read a ``state_dict()`` of this class or of ``AveragedModel`` (latest.pkl of any version)."""
        unknown = sorted(key for key in state if key != "n_averaged" and not key.startswith("module."))
        if "n_averaged" not in state or unknown:
            raise ValueError(f"not the state of a weight average ('module.<name>' entries and 'n_averaged', as "
                             f"AveragedModel writes it): {unknown[:3] or 'n_averaged missing'}")
        self.module.load_state_dict({key[len("module."):]: value for key, value in state.items()
                                     if key.startswith("module.")})
        self.updates = int(state["n_averaged"])
