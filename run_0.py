"""Train DCONet with the authors' recipe (Adam 1e-4, poly 0.9, 400 epochs, batch 8, 256x256, K = 5).

    python run_0.py --dataset demo                 # the built-in synthetic set, minutes on a laptop CPU
    python run_0.py --dataset IRSTD-1k             # datasets/IRSTD-1k/{trainval,test}/{images,masks}
    python run_0.py --dataset IRSTD-1k --resume    # continue an interrupted run
    torchrun --nproc_per_node 4 run_0.py --dataset NUDT-SIRST   # DistributedDataParallel

Every setting is a flag (python run_0.py --help); the run folder (Weight/<dataset>/) receives best.pkl,
latest.pkl, config.json, log.txt and TensorBoard event files.
"""
import sys

from utils.training import main

if __name__ == "__main__":
    sys.exit(main())
