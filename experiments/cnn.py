"""Claim 4: a VGG-style CNN (16-16-32-32 channels) on Fashion-MNIST at batch sizes 8 and 128.

    python experiments/cnn.py                              # full sweep (3 seeds) -> results/cnn
    python experiments/cnn.py --suffix cifar10 data=cifar10 model.channels=[32,64]   # CIFAR-10
    python experiments/cnn.py --smoke                      # tiny offline variant (digits)
"""

from bnp.sweep import run_experiment

NORMS, SEEDS = "none,bn,bnp,ln,gn", "0,1,2"
GRIDS = [
    {"norm": NORMS, "train.batch_size": "128", "optim.lr": "0.01,0.03,0.1,0.3", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": NORMS, "train.batch_size": "8", "optim.lr": "0.03", "train.seed": "0"}]
SMOKE_FIXED = ["data=digits", "train.steps=20", "train.eval_every=10", "train.log_every=10", "logger=none",
               "model.channels=[4,8]"]

if __name__ == "__main__":
    run_experiment("cnn", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, target=0.85)
