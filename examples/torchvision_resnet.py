"""BNP in a plain training loop on a torchvision model with its normalization layers removed.

    python examples/torchvision_resnet.py                  # ResNet-18 on random CIFAR-sized data
    python examples/torchvision_resnet.py --steps 3 --batch-size 4 --image-size 16     # a smoke run
    python examples/torchvision_resnet.py --rules bnp+agc  # BNP, then unit-wise clipping (bnp.Chain)

BNP changes the update, not the model: build the model without BatchNorm (``norm_layer`` returns an
Identity), give every convolution a bias (BNP centers through the bias), start each residual
branch at zero so every block starts as the identity, and call ``pre.step()`` between
``backward()`` and ``optimizer.step()``. Gradient rules chain after BNP or act alone:
``--rules bnp+agc`` is ``Chain(BNP(model), Clip(model, clip=1.0))``, ``--rules agc`` clipping alone.
Replace the random tensors by your own loader.
"""

import argparse

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from bnp import BNP, Chain, Clip


def resnet18_without_norm(classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=classes, norm_layer=lambda channels: nn.Identity())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and module.bias is None:  # a bias per conv, as BN's beta was
            module.bias = nn.Parameter(torch.zeros(module.out_channels))
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(block.conv2.weight)  # each residual branch starts at zero
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rules", choices=["bnp", "bnp+agc", "agc"], default="bnp",
                        help="BNP alone, BNP then unit-wise clipping, or clipping alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18_without_norm(classes=10)
    rules = {"bnp": lambda: BNP(model, fast=True),  # every Conv2d and the final Linear
             "bnp+agc": lambda: Chain(BNP(model, fast=True), Clip(model, clip=1.0)),
             "agc": lambda: Clip(model, clip=1.0)}
    pre = rules[args.rules]()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    print(pre)
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        y = torch.randint(0, 10, (args.batch_size,))
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
