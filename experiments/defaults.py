"""The defaults learn: every norm x batch size 1 / 16 / 128 with its default settings, on digits.

    python -m bnp.setting digits-mlp-defaults    # 3 seeds -> results/digits-mlp-defaults
    python experiments/defaults.py --smoke       # a few steps

Nothing is tuned here: each run uses the primary config's defaults (MLP 3x256, plain SGD at
optim.lr=null, i.e. bnp.config.DEFAULT_LR, 10 epochs), so the table shows what a new user gets.
"""

from bnp.sweep import run_experiment

GRIDS = [{"norm": "none,bn,bnp,ln,gn", "train.batch_size": "1,16,128", "train.seed": "0,1,2"}]
SMOKE_GRIDS = [{"norm": "none,bnp", "train.batch_size": "1,16", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=30", "train.eval_every=15", "train.log_every=15", "model.width=32"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "digits-mlp-defaults": [],
}

if __name__ == "__main__":
    run_experiment("defaults", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.95)
