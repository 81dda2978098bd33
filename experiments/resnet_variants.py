"""Claim 4's ResNet target: on ResNet-20 (Fashion-MNIST, 2 epochs, SGD + Nesterov momentum 0.9, cosine
schedule: the CPU setting of results/resnet_cpu), is the best BNP-family configuration within 1 point
of BatchNorm at batch 128, and ahead of BatchNorm and GroupNorm at batch 8? BatchNorm, GroupNorm, the
paper's BNP, BNP with unit-wise adaptive clipping (bnp_agc) and clipping alone (agc, the control)
against no normalization; 3 seeds, every learning rate bracketed, per-layer instruments logged.

    python experiments/resnet_variants.py                      # both batch sizes -> results/resnet_variants
    python experiments/resnet_variants.py --grids 1,2,3,4,5 train.seed=0   # batch 128, seed 0 only
    python experiments/resnet_variants.py --smoke              # tiny offline variant (digits)

Sized for a GPU: on a 2-core CPU (two runs at once) one batch-128 run takes 10-40 minutes and a
batch-8 run 6-8 minutes. The runs use experiment=resnet with the overrides in FIXED, so they are the
same runs (and the same run directories) as `python experiments/resnet.py --suffix variants
train.epochs=2 train.diagnostics=true ...`. Committed parts (each PROVENANCE.md lists its commands):
results/resnet_variants (seed 0, batch 128: bn, bnp_agc, agc), results/resnet_variants_b8 (seed 0,
batch 8: grids 6, 7 and 9 with `--suffix b8 --grids 6,7 --bracket-cap 2 train.seed=0`, then
`--grids 9`), results/resnet_variants_seeds (batch 128, 3 seeds at the lr seed 0 chose: bn 0.01,
bnp_agc 0.03, agc 0.1; and gn, bracketed on seed 0 there with `--grids 1 --bracket-cap 2
--confirm-seeds 0,1,2 norm=gn train.seed=0`: 0.03), results/resnet_variants_b8_seeds (batch 8, 3 seeds at the lr seed 0 chose: bn 0.003,
gn 0.01, bnp_agc 0.01, bnp 0.001) and results/resnet_variants_lars (grid 8 at seed 0, then `lars` at lr 0.3 and seeds 1 and 2 at the chosen lrs). Each holds its sweep.tar.gz, so
`--restore` with the same `--suffix` finishes the rest of its grids (e.g. seeds 1 and 2), and
`--confirm-seeds 0,1,2` adds the seeds at the chosen lrs only (bnp.sweep).

Is BNP + clipping's result robust? Two settings of their own, each screened on seed 0, bracketed,
then every lr tried run over 3 seeds (--all-seeds):

    # the projection-shortcut ResNet-20 (1x1 convolutions where the shape changes), 2 epochs
    python experiments/resnet_variants.py --suffix proj --grids 1,2,5 --bracket-cap 2 --all-seeds 0,1,2 \
        --launcher basic --results results/resnet20proj-b128-2ep model.shortcut=projection train.seed=0 train.threads=1
    # today's form at 3x the budget
    python experiments/resnet_variants.py --suffix 6ep --grids 1,2 --bracket-cap 2 --all-seeds 0,1,2 \
        --launcher basic --results results/resnet20-b128-6ep train.epochs=6 train.seed=0 train.threads=1

On 2 CPU cores (one run per core) a 2-epoch run takes 5-8 minutes and a 6-epoch run about 14; both
resume where they stopped (add --restore on another machine).
"""

from bnp.sweep import run_experiment

EXPERIMENT = "resnet"
FIXED = ["train.epochs=2", "train.diagnostics=true"]
SEEDS = "0,1,2"
GRIDS = [  # batch 128 (the config's): each method's lrs around its best in results/resnet_cpu and the seed-0 screen
    {"norm": "bn,gn", "optim.lr": "0.003,0.01,0.03", "train.seed": SEEDS},
    {"norm": "bnp_agc", "optim.lr": "0.01,0.03,0.1", "train.seed": SEEDS},
    {"norm": "agc", "optim.lr": "0.03,0.1,0.3", "train.seed": SEEDS},
    {"norm": "none", "optim.lr": "0.01,0.03,0.1", "train.seed": SEEDS},
    {"norm": "bnp", "optim.lr": "0.001,0.003,0.01", "train.seed": SEEDS},
    # batch 8, the same epochs: lrs about 1/16 of batch 128's (linear scaling), then bracketed
    {"norm": "bn,gn,bnp_agc", "train.batch_size": "8", "optim.lr": "0.0003,0.001,0.003", "train.seed": SEEDS},
    {"norm": "bnp", "train.batch_size": "8", "optim.lr": "0.0001,0.0003,0.001", "train.seed": SEEDS},
    # the layer-wise trust ratio with and without BNP (lr x trust is each layer's step as a fraction of its
    # weights, so lrs are ~1000x plain SGD's; 10 was best on the GAP CNN with momentum), batch 128 then 8
    {"norm": "bnp_lars,lars", "optim.lr": "3,10,30", "train.seed": SEEDS},
    {"norm": "bnp_lars,lars", "train.batch_size": "8", "optim.lr": "0.3,1,3", "train.seed": SEEDS},
]
SMOKE_GRIDS = [{"norm": "bn,gn,bnp,bnp_agc,agc,bnp_lars,lars", "optim.lr": "0.003", "train.seed": "0"},
               {"norm": "bn,bnp_agc", "train.batch_size": "8", "optim.lr": "0.003", "train.seed": "0"}]
SMOKE_FIXED = ["data=digits", "train.steps=6", "train.eval_every=3", "train.log_every=3", "logger=none"]

if __name__ == "__main__":
    run_experiment("resnet_variants", GRIDS, fixed=FIXED, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED,
                   target=0.85, experiment=EXPERIMENT)
