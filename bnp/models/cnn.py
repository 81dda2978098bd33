"""VGG-style CNN: stages of [Conv3x3 -> norm -> activation] x convs, max-pooling, then a head and a
Linear output layer named ``out``.

Heads: ``gap`` (max-pool between stages, global average pooling: few parameters, the modern form)
or ``fc`` (max-pool after every stage, flatten, an optional hidden Linear -> norm -> activation: the
classic CNN of the BN/BNP papers, where most weights sit in dense layers)."""

from torch import nn

from bnp.models.mlp import activation
from bnp.models.norm import make_norm

HEADS = ("gap", "fc")


class CNN(nn.Sequential):
    def __init__(self, in_channels: int, classes: int, *, channels: tuple[int, ...] = (32, 64),
                 convs_per_stage: int = 2, activation_name: str = "relu", norm: str = "none",
                 head: str = "gap", hidden: int = 0, image_size: tuple[int, int] = (28, 28)):
        if head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
        layers: list[nn.Module] = []
        c_in, (h, w) = in_channels, image_size
        for stage, c_out in enumerate(channels):
            if stage and head == "gap":
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), *make_norm(norm, c_out, conv=True),
                           activation(activation_name)]
                c_in = c_out
            if head == "fc":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        if head == "gap":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            features = c_in
        else:
            if h < 1 or w < 1:
                raise ValueError(f"head=fc: {len(channels)} max-pooling stages leave no pixels of a {image_size} image")
            layers.append(nn.Flatten())
            features = c_in * h * w
            if hidden:
                layers += [nn.Linear(features, hidden), *make_norm(norm, hidden, conv=False), activation(activation_name)]
                features = hidden
        super().__init__(*layers)
        self.add_module("out", nn.Linear(features, classes))
