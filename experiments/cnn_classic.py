"""Claim 4 on a classic hand-written CNN (conv3x3-ReLU-maxpool x 3 with 32/64/128 channels, flatten,
Linear; Fashion-MNIST, plain SGD, batch 128, one epoch): is BNP level with BatchNorm there, and does
BNP's statistics momentum 0.01 beat the automatic 0.1 (min(0.1, batch / 100)) at batch 128? Screened
on one seed, every learning rate bracketed, then every lr tried run on 3 seeds (--all-seeds).

    python -m bnp.setting cnn-classic-b128-1ep    # -> results/cnn-classic-b128-1ep
    python experiments/cnn_classic.py --smoke     # tiny offline variant (digits)
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
    "cnn-classic-b128-1ep": ["--all-seeds", "0,1,2"],
}

if __name__ == "__main__":
    run_experiment("cnn_classic", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
