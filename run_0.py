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

from utils.io.cpu_memory import limit_openmp_spinning

limit_openmp_spinning()   # before torch loads: spinning idle threads slow training on a busy CPU several times

from utils.cli import run_script, starting  # noqa: E402

with starting("run_0.py", active=__name__ == "__main__"):      # a Ctrl-C while torch loads: one line
    from utils.train.config import parse_command_line
    from utils.train.loop import fit
    from utils.train.run_dir import continue_hint


def main(argv: list[str] | None = None) -> int:
    config = None

    def train() -> int:
        nonlocal config
        config, given = parse_command_line(argv)
        fit(config, given)
        return 0

    return run_script("run_0.py", train,
                      interrupted=lambda: continue_hint(config) if config else "")


if __name__ == "__main__":
    sys.exit(main())
