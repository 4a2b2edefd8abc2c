"""Training: the settings (TrainConfig), the engine (train_one_epoch, evaluate: free functions returning dicts),
the loss and the poly schedule, run folders (checkpoints, logs, resume), the training DataLoader, the epoch loop (fit),
distributed set-up, and the run's learning curves."""
from utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("TrainConfig", "DEMO_DEFAULTS", "parse_command_line"),
    "engine": ("train_one_epoch", "evaluate", "predict_logits"),
    "losses": ("dconet_loss", "soft_iou_loss"),
    "schedule": ("poly_lr", "poly_scheduler"),
    "run_dir": ("NonFiniteLoss", "TrainingError", "continue_hint"),
    "loader": ("make_loader", "set_loader_epoch"),
    "loop": ("Trainer", "fit"),
})
