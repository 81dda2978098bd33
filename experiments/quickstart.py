"""The quickstart (`make run`): the MLP 64-128-128-10 on scikit-learn's digits (offline), no
normalization, BatchNorm, BNP and LayerNorm at batch size 1, 16 and 128, 10 epochs, 3 seeds.

    python -m bnp.setting quickstart          # -> results/quickstart (what `make run` does)
    python experiments/quickstart.py --smoke   # a tiny variant

Each method starts from three lrs around where a wider sweep of the same setting found its best
(0.003-1 by batch size); bracketing then extends any choice at a grid edge, so every table row is
still bracketed while the sweep stays small enough to print its table within minutes on 2 cores.
BatchNorm1d cannot run at batch 1: that row is reported as not applicable.
"""

from bnp.sweep import run_experiment

SEEDS = "0,1,2"
GRIDS = [  # (norm, batch size, lrs around the method's best at that batch size)
    {"norm": "none,bnp", "train.batch_size": "1", "optim.lr": "0.003,0.01,0.03", "train.seed": SEEDS},
    {"norm": "ln", "train.batch_size": "1", "optim.lr": "0.001,0.003,0.01", "train.seed": SEEDS},
    {"norm": "bn", "train.batch_size": "1", "optim.lr": "0.01", "train.seed": SEEDS},  # not applicable
    {"norm": "none,bn", "train.batch_size": "16", "optim.lr": "0.1,0.3,1", "train.seed": SEEDS},
    {"norm": "bnp,ln", "train.batch_size": "16", "optim.lr": "0.03,0.1,0.3", "train.seed": SEEDS},
    {"norm": "none,bn", "train.batch_size": "128", "optim.lr": "0.3,1,3", "train.seed": SEEDS},
    {"norm": "bnp", "train.batch_size": "128", "optim.lr": "0.03,0.1,0.3", "train.seed": SEEDS},
    {"norm": "ln", "train.batch_size": "128", "optim.lr": "0.1,0.3,1", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": "none,bnp", "train.batch_size": "16", "optim.lr": "0.03,0.1", "train.seed": "0"}]  # 2 lrs: one is extended
SMOKE_FIXED = ["model.width=16"]  # on top of bnp.sweep.SMOKE
SETTINGS = {"quickstart": []}  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make run)

if __name__ == "__main__":
    run_experiment("quickstart", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS)
