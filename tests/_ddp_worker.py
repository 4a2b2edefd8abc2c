"""Run by tests/test_training.py under torchrun: train a few steps, then write this rank's weights."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.training import Run, parse_config  # noqa: E402

if __name__ == "__main__":
    config = parse_config(sys.argv[1:])
    run = Run(config)
    try:
        run.fit()
        torch.save(run.model.state_dict(), Path(config.out) / f"rank{run.info.rank}.pt")
    finally:
        run.close()
