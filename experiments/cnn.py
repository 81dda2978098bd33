"""Claim 4: a VGG-style CNN (16-16-32-32 channels) on Fashion-MNIST with two heads: global average
pooling (``gap``, the modern form) and the classic flatten -> Linear head (``fc``, the kind of CNN
the BN and BNP papers used), at batch sizes 128 (2 epochs) and 8 (1 epoch), 3 seeds. Every learning
rate is bracketed (bnp.sweep).

    python -m bnp.setting cnn-gap-b128-2ep      # one of SETTINGS -> results/cnn-gap-b128-2ep
    python experiments/cnn.py --name cnn-cifar10 data=cifar10 model.channels=[32,64]   # CIFAR-10
    python experiments/cnn.py --smoke           # tiny offline variant (digits)

On a CPU budget, screen on one seed and run the chosen lrs (--confirm-seeds) or every lr tried
(--all-seeds) on three: add ``train.seed=0 --all-seeds 0,1,2``.
"""

from bnp.sweep import run_experiment

NORMS, HEADS = "none,bn,bnp,ln,gn", "gap,fc"
GRIDS = [
    {"model.head": HEADS, "norm": NORMS, "train.batch_size": "128", "optim.lr": "0.01,0.03,0.1,0.3",
     "train.seed": "0,1,2"},
    {"model.head": HEADS, "norm": NORMS, "train.batch_size": "8", "train.epochs": "1", "optim.lr": "0.003,0.01,0.03",
     "train.seed": "0"},
]
SMOKE_GRIDS = [{"model.head": HEADS, "norm": NORMS, "train.batch_size": "8", "optim.lr": "0.03", "train.seed": "0"}]
SMOKE_FIXED = ["train.steps=20", "train.eval_every=10", "train.log_every=10", "model.channels=[4,8]"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "cnn-gap-b128-2ep": ["--grids", "1", "model.head=gap"],
    "cnn-gap-b8-1ep": ["--grids", "2", "--all-seeds", "0,1,2", "model.head=gap"],
    "cnn-fc-b128-2ep": ["--grids", "1", "--all-seeds", "0,1,2", "model.head=fc"],
    "cnn-fc-b8-1ep": ["--grids", "2", "--all-seeds", "0,1,2", "model.head=fc"],
}

if __name__ == "__main__":
    run_experiment("cnn", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
