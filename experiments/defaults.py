"""The defaults learn: every norm x batch size 1 / 16 / 128 with its default settings, on digits.

    python -m bnp.setting digits-mlp-defaults    # 3 seeds -> results/digits-mlp-defaults
    python -m bnp.setting digits-mlp-bnp-b1-lr   # why BNP's default lr is 0.01 -> results/digits-mlp-bnp-b1-lr
    python experiments/defaults.py --smoke       # a few steps

Nothing is tuned here: each run uses the primary config's defaults (MLP 3x256, plain SGD at
optim.lr=null, i.e. bnp.config.DEFAULT_LR, 10 epochs), so the table shows what a new user gets.

digits-mlp-bnp-b1-lr is the evidence behind BNP's default lr at batch size 1 (grids 2-3, seed 0, no
bracketing): lrs 0.05 / 0.02 / 0.01 with and without 100 warmup steps, and 0.05 / 0.02 with a larger
variance floor (eps 0.1, 1.0), each for the default 10 epochs.
"""

from bnp.sweep import run_experiment

GRIDS = [{"norm": "none,bn,bnp,ln,gn", "train.batch_size": "1,16,128", "train.seed": "0,1,2"},
         {"norm": "bnp", "train.batch_size": "1", "optim.lr": "0.05,0.02,0.01", "norm.warmup": "0,100"},
         {"norm": "bnp", "train.batch_size": "1", "optim.lr": "0.05,0.02", "norm.eps": "0.1,1.0"}]
SMOKE_GRIDS = [{"norm": "none,bnp", "train.batch_size": "1,16", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=30", "train.eval_every=15", "train.log_every=15", "model.width=32"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "digits-mlp-defaults": ["--grids", "1"],
    "digits-mlp-bnp-b1-lr": ["--grids", "2,3", "--bracket-cap", "0"],
}

if __name__ == "__main__":
    run_experiment("defaults", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.95)
