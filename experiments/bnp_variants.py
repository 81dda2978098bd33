"""Claim 4, why BNP falls behind BatchNorm on CNNs with global average pooling: the paper's BNP,
the variants of its statistics (configs/norm/bnp_<variant>.yaml) and the gradient rules after it
(configs/grad) against BatchNorm on the GAP CNN of experiments/cnn.py (16-16-32-32, Fashion-MNIST,
plain SGD, 2 epochs) at batch size 32 (3,374 steps); screened on one seed, every learning rate
bracketed, then every lr tried run on 3 seeds (--all-seeds); per-layer instruments logged.

    python -m bnp.setting cnn-gap-b32-2ep         # -> results/cnn-gap-b32-2ep
    python experiments/bnp_variants.py --smoke    # tiny offline variant (digits)
"""

from bnp.sweep import run_experiment

VARIANTS = "bnp,bnp_releps,bnp_avgstart,bnp_skipends"
GRIDS = [  # two lrs each where experiments/cnn.py found the optimum; bracketing extends edge winners
    {"norm": "bn", "optim.lr": "0.3,1", "train.seed": "0"},  # 0.3 won 0.01-0.3 in experiments/cnn.py (batch 128)
    {"norm": VARIANTS, "optim.lr": "0.1,0.3", "train.seed": "0"},  # BNP: 0.1 won 0.01-0.3 there (batch 128)
    {"norm": "bnp", "grad": "agc", "optim.lr": "0.1,0.3", "train.seed": "0"},  # BNP + unit-wise clipping
    # each unit's step is divided by its output variance (up to 1 / eps = 100x): smaller lrs
    {"norm": "bnp", "grad": "outscale", "optim.lr": "0.01,0.03", "train.seed": "0"},
    # the control for bnp+agc: the same clipping without preconditioning (none won at 0.1 in experiments/cnn.py)
    {"norm": "none", "grad": "agc", "optim.lr": "0.1,0.3", "train.seed": "0"},
    {"norm": "none", "optim.lr": "0.1,0.3", "train.seed": "0"},  # and the plain network it clips
]
SMOKE_GRIDS = [{"norm": f"none,bn,{VARIANTS}", "optim.lr": "0.01", "train.seed": "0"},
               {"norm": "bnp,none", "grad": "outscale,agc", "optim.lr": "0.01", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=20", "train.eval_every=10", "train.log_every=10", "model.channels=[4,8]", "train.batch_size=8"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "cnn-gap-b32-2ep": ["--all-seeds", "0,1,2"],
}

if __name__ == "__main__":
    run_experiment("bnp_variants", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
