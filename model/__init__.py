"""DCONet in PyTorch: the model, its deploy form for inference, and its checkpoints."""
from .capabilities import HasKernels, HasLayout, Reparameterizable
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import DCONetConfig
from .dconet import DCONet, StageOutput, unwrap
from .deploy import DeployedDCONet, deploy, is_deployed
from .release import CheckpointError, from_release_state_dict, to_release_state_dict

__all__ = ["DCONet", "DCONetConfig", "StageOutput", "CheckpointError", "from_release_state_dict",
           "to_release_state_dict", "load_checkpoint", "load_model", "save_checkpoint", "deploy",
           "DeployedDCONet", "is_deployed", "unwrap", "Reparameterizable", "HasKernels", "HasLayout"]
