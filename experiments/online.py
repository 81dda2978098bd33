"""Claim 3: online learning (batch size 1, one pass over Fashion-MNIST) with an MLP and a CNN.

    python -m bnp.setting mlp-b1-1ep          # the MLP -> results/mlp-b1-1ep (also cnn-gap-b1-1ep, cnn-fc-b1-1ep)
    python experiments/online.py --smoke      # tiny offline variant (digits), about a minute

BatchNorm1d cannot run at batch size 1 (the MLP's bn runs are reported as not applicable);
BatchNorm2d runs but then normalizes each sample over positions only. The report's prequential
figure shows accuracy on the stream before each update.
"""

from bnp.sweep import run_experiment

SEEDS = "0,1,2"
GRIDS = [
    {"model": "mlp", "norm": "none,bn,bnp,ln,gn", "optim.lr": "0.0003,0.001,0.003,0.01,0.03", "train.seed": SEEDS},
    {"model": "cnn", "norm": "none,bn,bnp,ln", "optim.lr": "0.001,0.003,0.01,0.03", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"model": "mlp,cnn", "norm": "none,bnp,ln", "optim.lr": "0.01", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=40", "train.eval_every=20", "train.log_every=10", "model.width=32", "model.channels=[4,8]"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "mlp-b1-1ep": ["--grids", "1"],
    "cnn-gap-b1-1ep": ["--grids", "2", "model.head=gap"],
    "cnn-fc-b1-1ep": ["--grids", "2", "model.head=fc"],
}

if __name__ == "__main__":
    run_experiment("online", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
