"""Claim 4 (residual nets): ResNet-20 on Fashion-MNIST (offline) and CIFAR-10/100 where the files
can be had. Sized for a GPU: 30 epochs, SGD + Nesterov momentum, cosine schedule.

    python -m bnp.setting resnet                                   # Fashion-MNIST -> results/resnet
    python experiments/resnet.py --name resnet-cifar10 data=cifar10     # CIFAR-10 (augmented)
    python experiments/resnet.py --smoke                           # tiny offline variant (digits)

The CPU-sized ResNet-20 settings (2 and 6 epochs, batch 128 and 8, the variants) are in
experiments/resnet_variants.py.
"""

from bnp.sweep import run_experiment

NORMS, SEEDS = "none,bn,bnp,ln,gn", "0,1,2"
GRIDS = [{"norm": NORMS, "optim.lr": "0.03,0.1,0.3", "train.seed": SEEDS}]
SMOKE_GRIDS = [{"norm": NORMS, "optim.lr": "0.003", "train.seed": "0"}]  # BNP on the ResNet diverges from 0.03 up
SMOKE_FIXED = ["train.batch_size=16"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "resnet": [],
}

if __name__ == "__main__":
    run_experiment("resnet", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS, target=0.85)
