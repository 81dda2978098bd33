"""VGG-style CNN: stages of [Conv3x3 -> norm -> activation] x convs, max-pool between stages,
global average pooling, then a Linear output layer named ``out``."""

from torch import nn

from bnp.models.mlp import activation
from bnp.models.norm import make_norm


class CNN(nn.Sequential):
    def __init__(self, in_channels: int, classes: int, *, channels: tuple[int, ...] = (32, 64),
                 convs_per_stage: int = 2, activation_name: str = "relu", norm: str = "none"):
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage, c_out in enumerate(channels):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), *make_norm(norm, c_out, conv=True),
                           activation(activation_name)]
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(*layers)
        self.add_module("out", nn.Linear(c_in, classes))
