"""Optimizer and per-step learning-rate schedule from the config.

``sgd``, ``adam`` and ``adamw`` are torch.optim's; the preconditioned optimizers ``shampoo``,
``soap``, ``muon`` and ``kron`` (PSGD with Kronecker factors) come from pytorch-optimizer, each with
that library's documented defaults except what the config sets (lr, momentum or betas, weight
decay, ``precondition_every``). Muon orthogonalizes the updates of the hidden layers' weight
matrices (conv kernels flattened) and trains everything else (biases, the output layer) with its
AdamW at ``optim.aux_lr``, as its authors use it.
"""

import math

import torch
from torch import nn

from bnp.config import ConfigError, OptimConfig

PRECONDITIONED = ("shampoo", "soap", "muon", "kron")  # optim.name values from pytorch-optimizer


def build_optimizer(cfg: OptimConfig, model: nn.Module, total_steps: int, steps_per_epoch: int,
                    graph_device: torch.device | None = None):
    """The optimizer and its LambdaLR schedule. With ``graph_device`` (train.cuda_graph) the step
    must be capturable: Adam/AdamW keep lr and their step counts on the device (capturable=True),
    so the schedule reaches the replayed step; SGD reads its lr on the host, so it keeps a constant
    one (train.py checks optim.schedule)."""
    if cfg.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, foreach=graph_device is not None or None)
    elif cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        graph = {} if graph_device is None else {"capturable": True, "foreach": True}
        lr = cfg.lr if graph_device is None else torch.tensor(cfg.lr, device=graph_device)
        opt = cls(model.parameters(), lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **graph)
    else:
        opt = preconditioned(cfg, model)
    if cfg.schedule == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    elif cfg.schedule == "step":
        every = max(1, round(cfg.step_epochs * steps_per_epoch))
        factor = lambda step: cfg.gamma ** (step // every)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)  # every group keeps its own base lr


def preconditioned(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Shampoo, SOAP, Muon or Kron from pytorch-optimizer."""
    try:
        import pytorch_optimizer as po
    except ImportError:
        raise ConfigError(f"optim.name={cfg.name!r} needs pytorch-optimizer: pip install pytorch-optimizer "
                          "(bnp's experiments extra installs it)") from None
    every = cfg.precondition_every
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "shampoo":
        return po.Shampoo(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          **({} if every is None else {"preconditioning_compute_steps": every}))
    if cfg.name == "soap":
        return po.SOAP(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                       **({} if every is None else {"precondition_frequency": every}))
    if cfg.name == "kron":
        return po.Kron(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       **({} if every is None else {"pre_conditioner_update_probability": 1.0 / every}))
    hidden = muon_matrices(model)
    rest = [p for p in params if id(p) not in {id(m) for m in hidden}]
    aux = {} if cfg.aux_lr is None else {"adamw_lr": cfg.aux_lr}
    return po.Muon([{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}], lr=cfg.lr,
                   momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **aux)


def muon_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weights Muon orthogonalizes: every Linear / Conv weight but the output layer's (the last
    Linear in model order), which stays with AdamW like the biases."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    output = next((m for m in reversed(layers) if isinstance(m, nn.Linear)), None)
    return [m.weight for m in layers if m is not output and m.weight.requires_grad]
