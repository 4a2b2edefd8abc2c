"""Train DCONet with the authors' recipe (Adam 1e-4, poly 0.9, 400 epochs, batch 8, 256x256, K = 5).

    python run_0.py --dataset demo                 # the built-in synthetic set, minutes on a laptop CPU
    python run_0.py --dataset IRSTD-1k             # datasets/IRSTD-1k/{trainval,test}/{images,masks}
    python run_0.py --dataset IRSTD-1k --resume    # continue an interrupted run
    python run_0.py --config Weight/IRSTD-1k/config.json --out Weight/again   # a run's settings, given back
    torchrun --nproc_per_node 4 run_0.py --dataset NUDT-SIRST   # DistributedDataParallel

Every setting is a flag (python run_0.py --help); the run folder (Weight/<dataset>/) receives best.pkl,
latest.pkl, config.json, log.txt and TensorBoard event files. Exit status: 0 when the run finished, 1 when it
stopped on a non-finite loss, 2 on a problem the message explains, 130 when interrupted.
"""
import sys

from model import CheckpointError
from utils.config import parse_command_line
from utils.splits import DatasetError
from utils.run import NonFiniteLoss, TrainingError, continue_hint
from utils.training import fit


def main(argv: list[str] | None = None) -> int:
    try:
        config, given = parse_command_line(argv)
    except ValueError as error:        # a setting out of range, an unreadable --config
        print(f"run_0.py: {error}", file=sys.stderr)
        return 2
    try:
        fit(config, given)
    except (TrainingError, DatasetError, CheckpointError) as error:
        print(f"run_0.py: {error}", file=sys.stderr)
        return 1 if isinstance(error, NonFiniteLoss) else 2
    except KeyboardInterrupt:
        print(f"run_0.py: interrupted; {continue_hint(config.run_dir())}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
