"""Claim 4 at a longer budget: CNN 16-16-32-32 on Fashion-MNIST, batch 128, SGD momentum 0.9 with a
cosine schedule over 6 epochs, for no norm, BatchNorm, BNP and GroupNorm, 3 seeds.

    python -m bnp.setting cnn-gap-b128-6ep-momentum   # this file, then cnn_momentum_variants.py
    python experiments/cnn_momentum.py --smoke        # tiny offline variant (digits)
"""

from bnp.sweep import run_experiment

NORMS, SEEDS = "none,bn,bnp,gn", "0,1,2"
# Per-method lr grids: with momentum, BNP's preconditioned steps want smaller learning rates and the
# normalization layers larger ones (the shared grid 0.01-0.1 put their winners on its edges).
GRIDS = [
    {"norm": "none", "train.batch_size": "128", "optim.lr": "0.01,0.03,0.1", "train.seed": SEEDS},
    {"norm": "bn,gn", "train.batch_size": "128", "optim.lr": "0.01,0.03,0.1,0.3", "train.seed": SEEDS},
    {"norm": "bnp", "train.batch_size": "128", "optim.lr": "0.001,0.003,0.01,0.03", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": NORMS, "train.batch_size": "8", "optim.lr": "0.01", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=20", "train.eval_every=10", "train.log_every=10", "model.channels=[4,8]"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "cnn-gap-b128-6ep-momentum": [],
}

if __name__ == "__main__":
    run_experiment("cnn_momentum", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
