"""Run by tests/train/test_distributed.py under torchrun (two gloo ranks): give rank 1 other BatchNorm statistics,
validate, and write rank 0's model and scores; also read one step's loss parts, different on each rank."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.train.config import parse_command_line  # noqa: E402
from utils.train.distributed import barrier  # noqa: E402
from utils.train.engine import read_parts  # noqa: E402
from utils.train.loop import Trainer  # noqa: E402

if __name__ == "__main__":
    config, given = parse_command_line(sys.argv[1:])
    trainer = Trainer(config, given)
    try:
        rank = trainer.info.rank
        if rank == 1:                       # as after training: each rank's statistics of its own images
            with torch.no_grad():
                for name, buffer in trainer.model.named_buffers():
                    if name.endswith("running_mean"):
                        buffer.add_(0.5)
                    elif name.endswith("running_var"):
                        buffer.mul_(3.0)
        scores = trainer.validate(1)
        parts = read_parts([(7, torch.tensor([1.0, 2.0, 4.0]) * (rank + 1), 0.5)], trainer.info)
        out = Path(config.out)
        (out / f"rank{rank}.json").write_text(json.dumps({"scores": scores, "parts": parts}))
        if rank == 0:
            torch.save(trainer.model.state_dict(), out / "rank0.pt")
        barrier(trainer.info)               # neither rank takes the process group down while the other still works
    finally:
        trainer.close()
