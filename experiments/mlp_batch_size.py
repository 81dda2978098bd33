"""Claims 1-3: MLP on Fashion-MNIST, none / BN / BNP / LayerNorm x batch size 1, 2, 8, 32, 128.

    python -m bnp.setting mlp-b1-128-2ep                  # 3 seeds -> results/mlp-b1-128-2ep
    python experiments/mlp_batch_size.py --name mlp-mnist data=mnist   # the same on MNIST
    python experiments/mlp_batch_size.py --smoke          # tiny offline variant (digits), about a minute

The learning-rate grid moves with the batch size (4 values each; at batch sizes 1 and 2, 3 values
per method that cover its best in an earlier 0.001-0.03 grid, where BNP's, LayerNorm's and
BatchNorm's best sat at its lowest lr); the driver extends any grid whose best sits at an edge (bnp.sweep), and
the report picks each method's learning rate by mean validation accuracy over seeds.
"""

from bnp.sweep import run_experiment

NORMS, SEEDS = "none,bn,bnp,ln", "0,1,2"
GRIDS = [
    {"norm": "none", "train.batch_size": "1,2", "optim.lr": "0.001,0.003,0.01", "train.seed": SEEDS},
    {"norm": "bn,bnp,ln", "train.batch_size": "1,2", "optim.lr": "0.0003,0.001,0.003", "train.seed": SEEDS},
    {"norm": NORMS, "train.batch_size": "8,32", "optim.lr": "0.003,0.01,0.03,0.1", "train.seed": SEEDS},
    {"norm": NORMS, "train.batch_size": "128", "optim.lr": "0.01,0.03,0.1,0.3", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": NORMS, "train.batch_size": "1,32", "optim.lr": "0.003,0.01", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=40", "train.eval_every=20", "train.log_every=10", "model.width=32"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "mlp-b1-128-2ep": [],
}

if __name__ == "__main__":
    run_experiment("mlp_batch_size", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
