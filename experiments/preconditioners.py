"""Beyond the paper: BNP among the preconditioners. Does BNP's cheap diagonal buy what the full
input covariance, Adam, Shampoo, SOAP, Muon and PSGD-Kron buy, and at what step cost?

    python experiments/preconditioners.py                  # every grid, 3 seeds -> results/preconditioners
    python experiments/preconditioners.py --grids 3        # one batch size's grids (see GRIDS)
    python experiments/preconditioners.py --smoke          # tiny offline variant (digits)

The MLP 784-256-256-256-10 on Fashion-MNIST at batch 1, 8 and 128, and the fc-head CNN 16-16-32-32 at
batch 128. Batch 128 trains 2 epochs (842 steps); batch 8 and 1 train the same number of updates
(1000 steps, SMALL_BATCH), because 2 epochs at batch 1 are 108,000 steps and Shampoo takes about
0.13 s a step on one CPU core (results/bench/optimizers-cpu.md): the comparison is of what each
method does with a fixed number of updates. With the time for it, `train.steps=null
train.eval_every=null --name preconditioners-2ep` trains 2 epochs at every batch size. Methods (norm + optimizer): sgd (none + sgd), sgd+bnp, sgd+full (the
full-covariance rule, norm=bnp_full), adam, adam+bnp, shampoo, soap, muon, kron (pytorch-optimizer,
their documented defaults). Each method's lrs move down the 1-3-10 ladder with the batch size (BATCH_SHIFT); every grid runs 3 seeds and is bracketed.
GRIDS lists them in the order batch 128, 8, 1 (9 methods each: ``--grids 1,2,3,4,5,6,7,8,9`` is the MLP at
batch 128), then the CNN's 7 (grids 28-34, batch 128's lrs but CNN_LRS): its plain SGD and SGD + BNP are the runs of
results/cnn-fc-b128-2ep.
Step cost: benchmarks/bench_optimizers.py times each method against plain SGD in one process;
scripts/compare_preconditioners.py (run at the end) puts it beside the table: comparison.{md,csv},
accuracy_vs_cost.png.
"""

import subprocess
import sys
from pathlib import Path

from bnp.sweep import run_experiment

SEEDS = "0,1,2"
# method -> (norm, optim, lrs around its usual value at batch 128); batch 8 and 1 shift them down
METHODS = {
    "sgd": ("none", "sgd", (0.03, 0.1, 0.3)),
    "sgd+bnp": ("bnp", "sgd", (0.01, 0.03, 0.1)),
    "sgd+full": ("bnp_full", "sgd", (0.01, 0.03, 0.1)),
    "adam": ("none", "adam", (0.0003, 0.001, 0.003)),
    "adam+bnp": ("bnp", "adam", (0.0003, 0.001, 0.003)),
    "shampoo": ("none", "shampoo", (0.003, 0.01, 0.03)),  # its default 0.001 learned little on digits
    "soap": ("none", "soap", (0.001, 0.003, 0.01)),
    "muon": ("none", "muon", (0.01, 0.03, 0.1)),
    "kron": ("none", "kron", (0.0003, 0.001, 0.003)),
}
LADDER = [m * 10.0**e for e in range(-6, 1) for m in (1, 3)]  # 1e-6, 3e-6, ..., 1, 3: the grids' lrs
BATCH_SHIFT = {128: 0, 8: 1, 1: 2}  # ladder steps down from batch 128's lrs (batch 8: / ~3, batch 1: / 10; fewer
# than linear scaling: 1000 updates favour larger steps than 2 epochs do, and bracketing extends the rest)


def shifted(lr: float, steps: int) -> str:
    i = min(range(len(LADDER)), key=lambda j: abs(LADDER[j] - lr))
    return f"{LADDER[i - steps]:.1g}"


SMALL_BATCH = {"train.steps": "1000", "train.eval_every": "250"}  # batch 1 and 8: 1000 updates, 4 evaluations


def grid(method: str, batch_size: int, lrs: tuple[float, ...] | None = None, **fixed: str) -> dict[str, str]:
    norm, optim, usual = METHODS[method]
    lrs = lrs or usual
    budget = SMALL_BATCH if batch_size < 128 else {}
    return {"norm": norm, "optim": optim, "train.batch_size": str(batch_size), **budget,
            "optim.lr": ",".join(shifted(lr, BATCH_SHIFT[batch_size]) for lr in lrs), **fixed, "train.seed": SEEDS}


# the fc-head CNN's plain SGD and SGD + BNP are results/cnn-fc-b128-2ep's runs (the same configs): not trained
# twice, the comparison reads them there (scripts/compare_preconditioners.py, BORROWED)
CNN_ELSEWHERE = ("sgd", "sgd+bnp")
# Shampoo's MLP grids chose 0.1-0.3 after 3-4 extensions, but on the CNN lr 0.1 blew up within 210 steps (seeds 0, 1)
# (its steps cost about 0.7 s on one core): its CNN grid ends there, and bracketing extends a low edge
CNN_LRS = {"shampoo": (0.01, 0.03, 0.1)}
GRIDS = [grid(m, b) for b in (128, 8, 1) for m in METHODS] + [grid(m, 128, CNN_LRS.get(m), model="cnn")
                                                                 for m in METHODS if m not in CNN_ELSEWHERE]
SMOKE_GRIDS = [{"norm": norm, "optim": optim, "optim.lr": "0.003", "train.seed": "0"}
               for norm, optim, _ in METHODS.values()]
SMOKE_FIXED = ["model.width=16", "train.batch_size=8"]  # on top of bnp.sweep.SMOKE
SETTINGS = {  # results/<name>: the arguments that make it (python -m bnp.setting NAME, make fig-NAME)
    "preconditioners": ["--bracket-cap", "2"],
}

if __name__ == "__main__":
    out = run_experiment("preconditioners", GRIDS, smoke_grids=SMOKE_GRIDS, smoke_fixed=SMOKE_FIXED, settings=SETTINGS,
                         target=0.85)
    compare = Path(__file__).resolve().parent.parent / "scripts" / "compare_preconditioners.py"
    sys.exit(subprocess.call([sys.executable, str(compare), "--results", str(out)]))
