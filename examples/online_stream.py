"""Online learning with BNP: one sample at a time, predict first, then train (prequential accuracy).

    python examples/online_stream.py                 # scikit-learn's digits as a stream, 3 passes
    python examples/online_stream.py --passes 1 --limit 200                       # a smoke run

At batch size 1 BatchNorm cannot work (no variance in one sample); BNP keeps running statistics
across steps, so the same three lines train online. Predictions are made in eval mode, so they do
not count as training batches for BNP's statistics (as with BatchNorm).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from bnp import BNP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)[: args.limit] / 16.0
    y = torch.tensor(y)[: args.limit]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    pre = BNP(model, fast=True)  # momentum=None: a window of ~100 samples at batch size 1
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    correct = seen = 0
    for epoch in range(args.passes):
        for i in torch.randperm(len(x)).tolist():
            xi, yi = x[i : i + 1], y[i : i + 1]
            model.eval()
            with torch.no_grad():
                correct += int(model(xi).argmax(1) == yi)  # predict before training on it
            seen += 1
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(xi), yi).backward()
            pre.step()
            optimizer.step()
        print(f"pass {epoch + 1}: prequential accuracy {correct / seen:.4f} over {seen} samples")


if __name__ == "__main__":
    main()
