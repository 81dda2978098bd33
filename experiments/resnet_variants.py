"""Claim 4's ResNet target: on ResNet-20 (Fashion-MNIST, 2 epochs, SGD + Nesterov momentum 0.9, cosine
schedule), is the best BNP-family configuration within 1 point of BatchNorm at batch 128, and ahead of
BatchNorm and GroupNorm at batch 8? BatchNorm, GroupNorm, the paper's BNP, BNP with unit-wise adaptive
clipping (norm=bnp grad=agc: bnp+agc) and clipping alone (norm=none grad=agc: the control), the
layer-wise trust ratio with and without BNP, against no normalization; screened on seed 0, every
learning rate bracketed, then every lr tried run on 3 seeds (--all-seeds); per-layer instruments logged.

    python -m bnp.setting resnet20-b128-2ep       # SETTINGS below -> results/resnet20-b128-2ep
    python -m bnp.setting resnet20-b8-2ep         # batch 8
    python experiments/resnet_variants.py --smoke              # tiny offline variant (digits)

Is BNP + clipping's result robust? Two settings of their own: the projection-shortcut ResNet-20
(1x1 convolutions where the shape changes) at 2 epochs, and today's form at 3x the budget:

    python -m bnp.setting resnet20proj-b128-2ep train.threads=1
    python -m bnp.setting resnet20-b128-6ep train.threads=1

Each results directory's PROVENANCE.md lists the invocations that made its runs, and its
sweep.tar.gz the runs themselves: add --restore to finish a sweep on another machine. Runs made
under the earlier norm names (bnp_agc, agc, bnp_lars, lars) are read as bnp+agc, none+agc, bnp+lars,
none+lars; a grid of this file names them norm=... grad=..., whose run directories differ, so
rerunning a grid that holds such runs trains them again under the new names (rerun only the grids
whose rows are unfinished, e.g. `--grids 1 norm=gn`). On 2 CPU cores (one run per core) a 2-epoch
run takes 5-8 minutes, a 6-epoch run about 14 and a batch-8 run 6-8.
"""

from bnp.sweep import run_experiment

EXPERIMENT = "resnet"
FIXED = ["train.epochs=2", "train.diagnostics=true"]
SEEDS = "0,1,2"
GRIDS = [  # batch 128 (the config's): each method's lrs around its best in a one-seed screen
    {"norm": "bn,gn", "optim.lr": "0.003,0.01,0.03", "train.seed": SEEDS},
    {"norm": "bnp", "grad": "agc", "optim.lr": "0.01,0.03,0.1", "train.seed": SEEDS},
    {"norm": "none", "grad": "agc", "optim.lr": "0.03,0.1,0.3", "train.seed": SEEDS},
    {"norm": "none", "optim.lr": "0.01,0.03,0.1", "train.seed": SEEDS},
    {"norm": "bnp", "optim.lr": "0.001,0.003,0.01", "train.seed": SEEDS},
    # batch 8, the same epochs: lrs about 1/16 of batch 128's (linear scaling), then bracketed
    {"norm": "bn,gn", "train.batch_size": "8", "optim.lr": "0.0003,0.001,0.003", "train.seed": SEEDS},
    {"norm": "bnp", "grad": "agc", "train.batch_size": "8", "optim.lr": "0.0003,0.001,0.003", "train.seed": SEEDS},
    {"norm": "bnp", "train.batch_size": "8", "optim.lr": "0.0001,0.0003,0.001", "train.seed": SEEDS},
    # the layer-wise trust ratio with and without BNP (lr x trust is each layer's step as a fraction of its
    # weights, so lrs are ~1000x plain SGD's; 10 was best on the GAP CNN with momentum), batch 128 then 8
    {"norm": "bnp,none", "grad": "lars", "optim.lr": "3,10,30", "train.seed": SEEDS},
    {"norm": "bnp,none", "grad": "lars", "train.batch_size": "8", "optim.lr": "0.3,1,3", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": "bn,gn,bnp", "optim.lr": "0.003", "train.seed": "0"},
               {"norm": "bnp,none", "grad": "agc,lars", "optim.lr": "0.003", "train.seed": "0"},
               {"norm": "bn", "train.batch_size": "8", "optim.lr": "0.003", "train.seed": "0"},
               {"norm": "bnp", "grad": "agc", "train.batch_size": "8", "optim.lr": "0.003", "train.seed": "0"}]
SMOKE_FIXED = []  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "resnet20-b128-2ep": ["--grids", "1,2,3,4,5,9", "--bracket-cap", "2", "--all-seeds", "0,1,2", "train.seed=0"],
    # batch 8: BatchNorm's choice sits three steps above its grid (0.03), so three extensions per edge
    "resnet20-b8-2ep": ["--grids", "6,7,8,10", "--bracket-cap", "3", "--all-seeds", "0,1,2", "train.seed=0"],
    "resnet20-b128-6ep": ["--grids", "1,2", "--bracket-cap", "2", "--all-seeds", "0,1,2", "train.epochs=6", "train.seed=0"],
    "resnet20proj-b128-2ep": ["--grids", "1,2,5", "--bracket-cap", "2", "--all-seeds", "0,1,2", "model.shortcut=projection", "train.seed=0"],
}

if __name__ == "__main__":
    run_experiment("resnet_variants", GRIDS, fixed=FIXED, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS,
                   target=0.85, experiment=EXPERIMENT)
