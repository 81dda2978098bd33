"""Claim 4's momentum target: on the GAP CNN with SGD momentum 0.9, a cosine schedule and 6 epochs
(experiment=cnn_momentum, batch 128), does a BNP variant come within 1 point of BatchNorm? The paper's
BNP, BNP with unit-wise adaptive clipping (bnp+agc), BNP with a layer-wise trust ratio (bnp+lars) and,
as controls, the same clipping and trust ratio without preconditioning (none+agc, none+lars) against
BatchNorm; screened on one seed, every learning rate bracketed, then every lr tried run on 3 seeds
(--all-seeds); per-layer instruments logged.

    python -m bnp.setting cnn-gap-b128-6ep-momentum       # cnn_momentum.py, then this file
    python experiments/cnn_momentum_variants.py --smoke   # tiny offline variant (digits)
"""

from bnp.sweep import run_experiment

GRIDS = [  # two lrs each around the optimum experiments/cnn_momentum.py found; bracketing extends edges
    {"norm": "bn", "optim.lr": "0.3,1", "train.seed": "0"},  # 0.3 was the top of cnn_momentum's grid
    # 0.01 won 0.001-0.1 there with 3 seeds, interior: one lr (the 2-core budget)
    {"norm": "bnp", "optim.lr": "0.01", "train.seed": "0"},
    {"norm": "bnp", "grad": "agc", "optim.lr": "0.01,0.03", "train.seed": "0"},
    {"norm": "none", "grad": "agc", "optim.lr": "0.03,0.1", "train.seed": "0"},  # no norm won at 0.03 there
    # the layer-wise trust ratio and its control: lr x trust (0.001) is each layer's fraction per step,
    # and BatchNorm's layers moved about 0.005-0.01 of their weights per step here (diagnostics.md)
    {"norm": "bnp", "grad": "lars", "optim.lr": "0.3,1", "train.seed": "0"},
    {"norm": "none", "grad": "lars", "optim.lr": "0.3,1", "train.seed": "0"},
]
SMOKE_GRIDS = [{"norm": "bn,bnp", "optim.lr": "0.01", "train.seed": "0"},
               {"norm": "bnp,none", "grad": "agc,lars", "optim.lr": "0.01", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=20", "train.eval_every=10", "train.log_every=10", "model.channels=[4,8]", "train.batch_size=8"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "cnn-gap-b128-6ep-momentum": ["--bracket-cap", "2", "--all-seeds", "0,1,2"],
}

if __name__ == "__main__":
    run_experiment("cnn_momentum_variants", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
