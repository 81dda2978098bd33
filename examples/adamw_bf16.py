"""BNP with AdamW and bfloat16 autocast (any torch.optim optimizer works; BNP keeps its statistics
in float32 whatever the compute dtype).

    python examples/adamw_bf16.py                      # an MLP on scikit-learn's digits
    python examples/adamw_bf16.py --steps 60           # a smoke run

On a GPU the same code runs with ``device_type="cuda"``; with float16 add a GradScaler and call
``scaler.unscale_(optimizer)`` before ``pre.step()``, then ``scaler.step(optimizer)``.
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from bnp import BNP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32, device=device) / 16.0, torch.tensor(y, device=device)
    (train_x, test_x), (train_y, test_y) = x.split([1500, len(x) - 1500]), y.split([1500, len(y) - 1500])
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)).to(device)
    pre = BNP(model, fast=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    for step in range(args.steps):
        batch = torch.randint(0, len(train_x), (args.batch_size,), device=device)
        optimizer.zero_grad()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(train_x[batch]).float(), train_y[batch])
        loss.backward()
        pre.step()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
