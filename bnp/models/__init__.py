"""Model zoo: every model takes the normalization kind and builds its own norm layers.
(Only torch is needed here: the models work without Hydra / OmegaConf installed.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from bnp.models.cnn import CNN, HEADS
from bnp.models.mlp import MLP
from bnp.models.norm import NORMS, make_norm
from bnp.models.resnet import ARCHS, CIFAR_DEPTHS, SHORTCUTS, CifarResNet, resnet18

if TYPE_CHECKING:
    from bnp.config import ModelConfig

__all__ = ["ARCHS", "BUILDERS", "CNN", "HEADS", "MLP", "NORMS", "SHORTCUTS", "CifarResNet", "build_model", "make_norm",
           "resnet18"]


def _mlp(cfg: ModelConfig, norm: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    features = 1
    for s in shape:
        features *= s
    return MLP(features, classes, depth=cfg.depth, width=cfg.width, activation_name=cfg.activation, norm=norm)


def _cnn(cfg: ModelConfig, norm: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    return CNN(shape[0], classes, channels=tuple(cfg.channels), convs_per_stage=cfg.convs_per_stage,
               activation_name=cfg.activation, norm=norm, head=cfg.head, hidden=cfg.hidden,
               image_size=tuple(shape[1:]))


def _resnet(cfg: ModelConfig, norm: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    if cfg.arch == "resnet18":
        return resnet18(shape[0], classes, norm)
    return CifarResNet(CIFAR_DEPTHS[cfg.arch], shape[0], classes, norm, cfg.shortcut)


BUILDERS = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}  # model.name -> builder


def build_model(cfg: ModelConfig, norm: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    """The configured model for inputs of ``shape`` (C, H, W) and ``classes`` outputs."""
    return BUILDERS[cfg.name](cfg, norm, shape, classes)
