"""DCONet in PyTorch: the model and its checkpoints."""
from .checkpoint import (CheckpointError, from_release_state_dict, load_checkpoint, load_model,
                         save_checkpoint, to_release_state_dict)
from .config import DCONetConfig
from .dconet import DCONet, StageOutput, unwrap
from .fast import is_deployed, optimize_for_inference

__all__ = ["DCONet", "DCONetConfig", "StageOutput", "CheckpointError", "from_release_state_dict",
           "to_release_state_dict", "load_checkpoint", "load_model", "save_checkpoint", "optimize_for_inference",
           "is_deployed", "unwrap"]
