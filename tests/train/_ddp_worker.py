"""Run by the training tests under torchrun: train, then write this rank's weights.

    _ddp_worker.py [--stop-after E] TRAINING ARGUMENTS...

``--stop-after E``: stop when E epochs are done (latest.pkl written), as an interrupted run would, without
writing the weights."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import utils.train.loop as loop  # noqa: E402
from utils.train.config import parse_command_line  # noqa: E402
from utils.train.loop import Trainer  # noqa: E402


class Stopped(Exception):
    pass


def stop_after(epochs: int) -> None:
    """Make the loop stop where it would start epoch ``epochs + 1``."""
    real = loop.set_loader_epoch

    def set_loader_epoch(loader, epoch: int) -> None:
        if epoch == epochs:
            raise Stopped
        real(loader, epoch)
    loop.set_loader_epoch = set_loader_epoch


if __name__ == "__main__":
    argv = sys.argv[1:]
    stop = None
    if argv[:1] == ["--stop-after"]:
        stop, argv = int(argv[1]), argv[2:]
        stop_after(stop)
    config, given = parse_command_line(argv)
    trainer = Trainer(config, given)
    try:
        trainer.fit()
        torch.save(trainer.model.state_dict(), Path(config.out) / f"rank{trainer.info.rank}.pt")
    except Stopped:
        pass
    finally:
        trainer.close()
