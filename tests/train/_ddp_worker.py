"""Run by tests/train/test_loop.py under torchrun: train a few steps, then write this rank's weights."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.train.config import parse_command_line  # noqa: E402
from utils.train.loop import Trainer  # noqa: E402

if __name__ == "__main__":
    config, given = parse_command_line(sys.argv[1:])
    trainer = Trainer(config, given)
    try:
        trainer.fit()
        torch.save(trainer.model.state_dict(), Path(config.out) / f"rank{trainer.info.rank}.pt")
    finally:
        trainer.close()
