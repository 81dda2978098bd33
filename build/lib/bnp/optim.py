"""Optimizer and per-step learning-rate schedule from the config."""

import math

import torch

from bnp.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params, total_steps: int, steps_per_epoch: int,
                    graph_device: torch.device | None = None):
    """The optimizer and its LambdaLR schedule. With ``graph_device`` (train.cuda_graph) the step
    must be capturable: Adam/AdamW keep lr and their step counts on the device (capturable=True),
    so the schedule reaches the replayed step; SGD reads its lr on the host, so it keeps a constant
    one (train.py checks optim.schedule)."""
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, foreach=graph_device is not None or None)
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        graph = {} if graph_device is None else {"capturable": True, "foreach": True}
        lr = cfg.lr if graph_device is None else torch.tensor(cfg.lr, device=graph_device)
        opt = cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **graph)
    if cfg.schedule == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    elif cfg.schedule == "step":
        every = max(1, round(cfg.step_epochs * steps_per_epoch))
        factor = lambda step: cfg.gamma ** (step // every)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
