"""Fully connected network: Flatten -> [Linear -> norm -> activation] x depth -> Linear."""

from torch import nn

from bnp.models.norm import make_norm

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class MLP(nn.Sequential):
    """MLP with ``depth`` hidden layers of ``width`` units; the output layer is named ``out``."""

    def __init__(self, in_features: int, classes: int, *, depth: int = 3, width: int = 256,
                 activation_name: str = "relu", norm: str = "none"):
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), *make_norm(norm, width, conv=False), activation(activation_name)]
            features = width
        super().__init__(*layers)
        self.add_module("out", nn.Linear(features, classes))
