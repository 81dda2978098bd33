"""Residual networks for small images.

- ``resnet20/32/56/110``: the CIFAR ResNets of He et al. (2016): three stages of 16/32/64 channels,
  (depth - 2) / 6 basic blocks per stage, parameter-free shortcuts (subsample + zero channel padding;
  the paper's option A) or, with ``shortcut="projection"``, a 1x1 convolution (and its norm layer)
  where the shape changes (option B, the other common CIFAR form).
- ``resnet18``: torchvision's ResNet-18 adapted to small images (3x3 stride-1 stem, no max-pool);
  its output layer keeps torchvision's name ``fc`` (``out`` in the other models).

Without normalization layers (norm none / bnp) every conv gets a bias (BNP centers through it) and
the last conv of each residual branch starts at zero, so every block starts as the identity and the
signal keeps its scale at initialization (as in SkipInit / Fixup's zero-init); BNP changes updates,
not the forward pass, so it needs the same.
"""

import torch
from torch import nn
from torch.nn import functional as F

from bnp.models.norm import make_norm

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
ARCHS = (*CIFAR_DEPTHS, "resnet18")  # model.arch
SHORTCUTS = ("identity", "projection")  # model.shortcut of the CIFAR ResNets


def _normalized(norm: str) -> bool:
    return norm not in ("none", "bnp")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, shortcut: str = "identity"):
        super().__init__()
        bias = not _normalized(norm)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.norm1 = nn.Sequential(*make_norm(norm, c_out, conv=True))
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.norm2 = nn.Sequential(*make_norm(norm, c_out, conv=True))
        self.stride, self.pad = stride, c_out - c_in
        self.project = None  # option B: a 1x1 convolution where the shape changes
        if shortcut == "projection" and (stride > 1 or c_in != c_out):
            self.project = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=bias),
                                         *make_norm(norm, c_out, conv=True))
        if not _normalized(norm):
            nn.init.zeros_(self.conv2.weight)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            return self.project(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, classes: int, norm: str, shortcut: str = "identity"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {list(SHORTCUTS)}, got {shortcut!r}")
        blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=not _normalized(norm))
        self.stem_norm = nn.Sequential(*make_norm(norm, 16, conv=True))
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and b == 0 else 1, norm, shortcut))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.out = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem_norm(self.stem(x))))
        return self.out(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _with_bias(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        new.bias.zero_()
    return new


def resnet18(in_channels: int, classes: int, norm: str) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18  # lazy: importing torchvision takes ~2 s

    def norm_layer(channels: int) -> nn.Module:
        layers = make_norm(norm, channels, conv=True)
        return layers[0] if layers else nn.Identity()

    model = tv_resnet18(num_classes=classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    if not _normalized(norm):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and child.bias is None:
                    setattr(parent, name, _with_bias(child))
        for block in (m for m in model.modules() if type(m).__name__ == "BasicBlock"):
            nn.init.zeros_(block.conv2.weight)
    return model
