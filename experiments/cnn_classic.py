"""Claim 4 on a classic hand-written CNN (conv3x3-ReLU-maxpool x 3 with 32/64/128 channels, flatten,
Linear; Fashion-MNIST, plain SGD, batch 128, one epoch): is BNP level with BatchNorm there, and does
BNP's statistics momentum 0.01 beat the automatic 0.1 (min(0.1, batch / 100)) at batch 128? One seed
(the 2-core CPU budget), every learning rate bracketed.

    python experiments/cnn_classic.py           # -> results/cnn_classic
    python experiments/cnn_classic.py --smoke   # tiny offline variant (digits)
    python experiments/cnn_classic.py --confirm-seeds 0,1,2   # then 3 seeds at each chosen lr

results/cnn_classic_seeds holds 3 seeds of BatchNorm and BNP at the lrs results/cnn_classic chose
(`--suffix seeds --grids 1 --bracket-cap 0 norm=X optim.lr=Y train.seed=0,1,2`, its PROVENANCE.md).
"""

from bnp.sweep import run_experiment

LRS, SEEDS = "0.01,0.03,0.1", "0"
GRIDS = [
    {"norm": "none,bn,bnp", "optim.lr": LRS, "train.seed": SEEDS},
    # its own row in the tables: the variant label keeps it apart from the automatic momentum
    {"norm": "bnp", "norm.momentum": "0.01", "norm.variant": "bnp_m0.01", "optim.lr": LRS, "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": "none,bn,bnp", "optim.lr": "0.03", "train.seed": "0"},
               {"norm": "bnp", "norm.momentum": "0.01", "norm.variant": "bnp_m0.01", "optim.lr": "0.03",
                "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=20", "train.eval_every=10", "train.log_every=10", "model.channels=[4,8,8]", "train.batch_size=8"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "cnn-classic-b128-1ep": [],
}

if __name__ == "__main__":
    run_experiment("cnn_classic", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
