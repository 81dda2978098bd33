"""Typed run configuration, validated before any training.

The Hydra YAML files under ``configs/`` are merged onto these dataclasses: OmegaConf rejects unknown
keys and wrong types (naming the full key), and ``__post_init__`` checks choices and ranges with a
message that names the field and the accepted values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnp import options
from bnp.data import SOURCES
from bnp.models import ARCHS, BUILDERS, HEADS, NORMS, SHORTCUTS
from bnp.models.mlp import ACTIVATIONS
from bnp.rules import RULE_ORDER  # configs/grad's rules, in the order they act

# the accepted values, from the registries that implement them
MODELS, RESNET_ARCHS, DATASETS = tuple(BUILDERS), ARCHS, tuple(SOURCES)
OPTIMIZERS = ("sgd", "adam", "adamw", "shampoo", "soap", "muon", "kron")  # the last four: pytorch-optimizer
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
COVARIANCES = ("diagonal", "full")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is accepted."""


class NotApplicable(ConfigError):
    """A valid configuration that cannot run by design (e.g. BatchNorm1d at batch size 1).

    A single run fails with this message; inside a sweep the run is recorded as not applicable.
    """


def _choice(field_name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{field_name}: {value!r} is not one of {list(accepted)}")


def _check(field_name: str, ok: bool, requirement: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: must be {requirement}, got {value!r}")


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | cnn | resnet
    depth: int = 3  # mlp: hidden layers
    width: int = 256  # mlp: units per hidden layer
    activation: str = "relu"
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn: channels per stage
    convs_per_stage: int = 2  # cnn
    head: str = "gap"  # cnn: gap (global average pooling) | fc (flatten -> [hidden Linear] -> Linear)
    hidden: int = 0  # cnn head=fc: units of a hidden Linear layer (0: none)
    arch: str = "resnet20"  # resnet: resnet20/32/56/110 (CIFAR-style) or resnet18 (torchvision)
    # resnet20-110: identity (parameter-free, subsample + zero padding) | projection (1x1 conv where the
    # shape changes); resnet18 has torchvision's projection shortcuts whatever this says
    shortcut: str = "identity"

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODELS)
        _choice("model.activation", self.activation, tuple(ACTIVATIONS))
        _choice("model.arch", self.arch, RESNET_ARCHS)
        _choice("model.shortcut", self.shortcut, SHORTCUTS)
        _check("model.depth", self.depth >= 1, "an integer >= 1", self.depth)
        _check("model.width", self.width >= 1, "an integer >= 1", self.width)
        _check("model.channels", len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
               "a non-empty list of positive integers", list(self.channels))
        _check("model.convs_per_stage", self.convs_per_stage >= 1, "an integer >= 1", self.convs_per_stage)
        _choice("model.head", self.head, HEADS)
        _check("model.hidden", self.hidden >= 0, "an integer >= 0 (0: no hidden layer)", self.hidden)


@dataclass
class NormConfig:
    kind: str = "bnp"  # none | bn | bnp | ln | gn (the primary config's default, configs/config.yaml)
    # BNP options (used when kind == bnp); see bnp.BNP
    momentum: Optional[float] = None  # null = auto: min(0.1, batch size / 100)
    eps: float = 0.01
    warmup: int = 0
    center: bool = True
    scale: bool = True
    skip: list[str] = field(default_factory=list)
    fast: bool = False  # bnp.BNP's default: true computes Linear gradients inside backward (same numbers, less memory traffic)
    # variants of BNP's statistics (bnp.BNP; configs/norm/bnp_<variant>.yaml), both off in the paper's BNP
    eps_relative: bool = False  # eps x each layer's mean input variance instead of an absolute floor
    average_start: bool = False  # cumulative average of the first 1/momentum batches
    # diagonal: BNP (inverse variances) | full: the inverse running covariance of each layer's inputs
    # (bnp.precondition.covariance.FullCovariance), inverted every `refresh` steps
    covariance: str = "diagonal"
    refresh: int = 10
    variant: str = ""  # the name tables give this norm (a variant's config sets it; empty: kind)

    def __post_init__(self) -> None:
        _choice("norm.kind", self.kind, NORMS)
        for name, accepted, value in options.problems(  # BNP's own rules (bnp/options.py), named as config keys
                momentum=self.momentum, eps=self.eps, warmup=self.warmup,
                **{k: getattr(self, k) for k in ("center", "scale", "fast", "eps_relative", "average_start")}):
            _check(f"norm.{name}", False, accepted.replace("None", "null").replace("True or False", "true or false"),
                   value)
        _choice("norm.covariance", self.covariance, COVARIANCES)
        _check("norm.refresh", self.refresh >= 1, "an integer >= 1 (steps between inversions)", self.refresh)
        variants = [k for k in ("eps_relative", "average_start") if getattr(self, k)]
        _check("norm.kind", self.kind == "bnp" or not variants, f"'bnp' for the BNP options {variants}", self.kind)
        if self.covariance == "full":
            _check("norm.kind", self.kind == "bnp", "'bnp' with norm.covariance='full'", self.kind)
            unsupported = variants + [k for k in ("center", "scale") if not getattr(self, k)]
            unsupported += ["warmup"] if self.warmup else []
            _check("norm.covariance", not unsupported, f"'diagonal' with the BNP options {unsupported} (the full "
                   "rule always centers and scales, from the first step)", self.covariance)


def _positive(field_name: str, value: float) -> None:
    _check(field_name, options.is_positive(value), "a finite number > 0", value)


@dataclass
class OutScaleConfig:  # configs/grad/outscale.yaml: bnp.OutputScale
    eps: float = 0.01
    momentum: Optional[float] = None  # null = auto: min(0.1, batch size / 100)

    def __post_init__(self) -> None:
        for name, accepted, value in options.problems(momentum=self.momentum, eps=self.eps):
            _check(f"grad.outscale.{name}", False, accepted.replace("None", "null"), value)


@dataclass
class AGCConfig:  # configs/grad/agc.yaml: bnp.Clip
    clip: float = 1.0

    def __post_init__(self) -> None:
        _positive("grad.agc.clip", self.clip)


@dataclass
class LARSConfig:  # configs/grad/lars.yaml: bnp.Trust
    trust: float = 0.001

    def __post_init__(self) -> None:
        _positive("grad.lars.trust", self.trust)


@dataclass
class GradConfig:
    """Gradient rules after the norm's preconditioner (``grad=[agc,lars]``), applied in RULE_ORDER."""

    outscale: Optional[OutScaleConfig] = None
    agc: Optional[AGCConfig] = None
    lars: Optional[LARSConfig] = None

    def rules(self) -> list[str]:
        """The chosen rules' names, in the order they act."""
        return [name for name in RULE_ORDER if getattr(self, name) is not None]


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"  # looked up first; downloads go here
    download: bool = True  # try torchvision's download when no local copy is found
    val_fraction: float = 0.1  # of the training set, held out for model selection
    test_fraction: float = 0.2  # digits / synthetic only: they have no official test split
    split_seed: int = 0  # the same split for every run, whatever train.seed is
    augment: Optional[bool] = None  # random crop + flip; None: on for CIFAR, off otherwise
    limit: Optional[int] = None  # keep only the first N training samples (smoke tests)
    # synthetic: a linear teacher seen through badly scaled, off-center features
    samples: int = 3000
    shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    classes: int = 4

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATASETS)
        _check("data.val_fraction", 0 < self.val_fraction < 1, "in (0, 1)", self.val_fraction)
        _check("data.test_fraction", 0 < self.test_fraction < 1, "in (0, 1)", self.test_fraction)
        _check("data.limit", self.limit is None or self.limit >= 2, "null or an integer >= 2", self.limit)
        _check("data.samples", self.samples >= 10, "an integer >= 10", self.samples)
        _check("data.shape", len(self.shape) == 3 and all(s >= 1 for s in self.shape),
               "[channels, height, width] with positive entries", list(self.shape))
        _check("data.classes", self.classes >= 2, "an integer >= 2", self.classes)

    def augments(self) -> bool:
        """Random crop + flip: data.augment, or by default on for CIFAR only."""
        return self.augment if self.augment is not None else self.name.startswith("cifar")


# optim.lr=null picks these (results/defaults: every norm x batch size 1/16/128 learns on digits).
# BNP's steps are larger at the same lr (it divides by the inputs' variance + eps, down to eps = 0.01
# on near-constant inputs): with plain SGD at batch size 1 it blew up within 100 steps at 0.02.
# The preconditioned optimizers start from pytorch-optimizer's documented defaults.
DEFAULT_LR = {("sgd", "bnp"): 0.01, "sgd": 0.05, "adam": 0.001, "adamw": 0.001, "shampoo": 0.001, "soap": 0.003,
              "muon": 0.02, "kron": 0.001}


def default_lr(optimizer: str, norm: str) -> float:
    return DEFAULT_LR.get((optimizer, norm), DEFAULT_LR[optimizer])


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw | shampoo | soap | muon | kron (configs/optim/<name>.yaml)
    lr: Optional[float] = None  # null: default_lr(name, norm.kind)
    momentum: float = 0.0  # sgd, shampoo, muon, kron
    nesterov: bool = False  # sgd, muon
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw / soap
    precondition_every: Optional[int] = None  # shampoo / soap: steps between preconditioner updates; kron:
    # one update every this many steps on average; null: the library's default
    aux_lr: Optional[float] = None  # muon: the AdamW lr of what Muon does not orthogonalize; null: 3e-4
    schedule: str = "constant"  # constant | cosine | step
    step_epochs: float = 30.0  # step schedule: multiply lr by gamma every step_epochs epochs
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, OPTIMIZERS)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _check("optim.lr", self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
               "a finite number > 0 (or null: the default for the optimizer and norm)", self.lr)
        _check("optim.momentum", 0 <= self.momentum < 1, "in [0, 1)", self.momentum)
        _check("optim.nesterov", not self.nesterov or self.momentum > 0, "false unless optim.momentum > 0",
               self.nesterov)
        _check("optim.weight_decay", self.weight_decay >= 0, ">= 0", self.weight_decay)
        _check("optim.betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "two numbers in [0, 1)", list(self.betas))
        _check("optim.step_epochs", self.step_epochs > 0, "> 0", self.step_epochs)
        _check("optim.gamma", 0 < self.gamma <= 1, "in (0, 1]", self.gamma)
        _check("optim.precondition_every", self.precondition_every is None or self.precondition_every >= 1,
               "null (the library's default) or an integer >= 1", self.precondition_every)
        _check("optim.aux_lr", self.aux_lr is None or (self.aux_lr > 0 and math.isfinite(self.aux_lr)),
               "null (3e-4) or a finite number > 0", self.aux_lr)


@dataclass
class TrainConfig:
    epochs: float = 10.0  # used when steps is null
    steps: Optional[int] = None  # optimizer steps; overrides epochs
    batch_size: int = 32  # 1 = online learning
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs cuda)
    eval_every: Optional[int] = None  # steps between evaluations; null: evals_per_epoch
    evals_per_epoch: int = 1
    log_every: int = 100  # steps between train-metric rows (one host sync each)
    eval_batch_size: int = 1000
    rerun: bool = False  # redo a run whose summary says completed (otherwise it is skipped)
    threads: Optional[int] = None  # torch CPU threads; null = torch's default (parallel sweeps set 1)
    cuda_graph: bool = False  # replay each training step as one CUDA graph (cuda; see README)
    compile: bool = False  # torch.compile the model (BNP's fast Linear layers take the reference path)
    verbose: bool = False  # a line per evaluation also inside sweeps (single runs always print them)
    diagnostics: bool = False  # per-layer update/weight ratios and BNP statistics in each train row (bnp.analysis)
    # diverged: a non-finite loss or parameter, or a logged train loss above diverge_factor x the
    # untrained model's validation loss (step 0); null turns the blow-up rule off
    diverge_factor: Optional[float] = 10.0

    def __post_init__(self) -> None:
        _check("train.epochs", self.epochs > 0, "> 0", self.epochs)
        _check("train.steps", self.steps is None or self.steps >= 1, "null or an integer >= 1", self.steps)
        _check("train.batch_size", self.batch_size >= 1, "an integer >= 1", self.batch_size)
        _choice("train.device", self.device, DEVICES)
        _choice("train.precision", self.precision, PRECISIONS)
        _check("train.eval_every", self.eval_every is None or self.eval_every >= 1, "null or an integer >= 1",
               self.eval_every)
        _check("train.log_every", self.log_every >= 1, "an integer >= 1", self.log_every)
        _check("train.evals_per_epoch", self.evals_per_epoch >= 1, "an integer >= 1", self.evals_per_epoch)
        _check("train.eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1", self.eval_batch_size)
        _check("train.threads", self.threads is None or self.threads >= 1, "null or an integer >= 1", self.threads)
        _check("train.diverge_factor", self.diverge_factor is None or self.diverge_factor > 1, "null (off) or > 1",
               self.diverge_factor)


@dataclass
class LoggerConfig:
    wandb: str = "offline"  # offline | online | disabled; local files are always written
    project: str = "bnp"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice("logger.wandb", self.wandb, WANDB_MODES)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    grad: GradConfig = field(default_factory=GradConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "default"  # sweep / experiment name
    out_root: str = "outputs"  # runs go to <out_root>/runs, sweeps to <out_root>/sweeps

    def __post_init__(self) -> None:
        if self.optim.lr is None:
            self.optim.lr = default_lr(self.optim.name, self.norm.kind)


def _unknown_keys(given: Any, schema: Any, prefix: str = "") -> None:
    """Keys of ``given`` that the schema lacks (Hydra lets ``+key=value`` add them to a typed node,
    and the schema would then drop them silently)."""
    if not isinstance(given, (dict, DictConfig)) or not isinstance(schema, DictConfig):
        return
    for key in given:
        if key not in schema:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(f"{prefix}{key}: not a key of {where} (it accepts: {', '.join(map(str, schema))}); "
                              f"remove the override that adds it (+{prefix}{key}=...)")
        _unknown_keys(given[key], schema[key], f"{prefix}{key}.")


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Merge ``cfg`` onto the schema and return a checked ``RunConfig``; raise ConfigError."""
    schema = OmegaConf.structured(RunConfig)
    _unknown_keys(cfg, schema)
    try:
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        # OmegaConf's message already names the full key; keep only its first lines
        raise ConfigError(str(err).split("\n    object_type")[0].strip()) from None


def check_applicable(cfg: RunConfig) -> None:
    """Raise NotApplicable for valid settings that cannot run by design."""
    if cfg.norm.kind == "bn" and cfg.train.batch_size == 1 and cfg.model.name == "mlp":
        raise NotApplicable(
            "norm=bn with train.batch_size=1: BatchNorm1d normalizes each feature over the batch, "
            "and a batch of one sample has no variance (PyTorch raises). For online learning use "
            "norm=bnp (statistics tracked across steps) or norm=ln (per-sample normalization)."
        )


# ------------------------------------------------------------------ can this run here?
def resolve_device(cfg: RunConfig) -> torch.device:
    """train.device as a torch.device (auto: CUDA when there is one)."""
    wanted = cfg.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for, but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cuda" if wanted == "auto" and torch.cuda.is_available() else wanted.replace("auto", "cpu"))


def check_runnable(cfg: RunConfig, device: torch.device, world: int = 1, train_samples: int | None = None,
                   real_capture: bool = True) -> None:
    """Everything that depends on where the run goes (device, processes, data size), as config
    errors naming the field; ``real_capture=False``: train.cuda_graph with a stand-in capture."""
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'")
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} must be divisible by "
                          f"the number of processes ({world})")
    if train_samples is not None and train_samples < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training set "
                          f"({train_samples} samples)")
    if cfg.train.cuda_graph:
        check_cuda_graph(cfg, device, world, real_capture)
        if cfg.train.compile:
            raise ConfigError("train.compile: not with train.cuda_graph=true (choose one: the runner captures "
                              "eager steps; torch.compile(mode='reduce-overhead') would capture graphs itself)")


def check_cuda_graph(cfg: RunConfig, device: torch.device, world: int = 1, real_capture: bool = True) -> None:
    """What a captured training step cannot do, as config errors."""
    def refuse(reason: str) -> None:
        raise ConfigError(f"train.cuda_graph: {reason}; or set train.cuda_graph=false")

    if device.type != "cuda" and real_capture:
        refuse(f"needs a CUDA device (train.device resolved to {device.type!r})")
    if cfg.train.precision == "fp16":
        refuse("not with train.precision='fp16' (its gradient scaler reads the host); use 'bf16' or 'fp32'")
    if cfg.data.augments():
        refuse("not with data augmentation (data.augment, on by default for CIFAR); set data.augment=false")
    if world > 1:
        refuse(f"not with several processes ({world}); one process per GPU has no graph mode yet")
    if cfg.norm.kind == "bnp" and cfg.norm.covariance == "full":
        refuse("not with norm.covariance='full' (its inverses are refreshed on the host)")
    if cfg.norm.kind == "bnp" and cfg.norm.average_start or cfg.grad.outscale is not None:
        refuse("not with norm.average_start or grad=outscale (their momentum changes from step to step "
               "on the host, which a captured graph would freeze)")
    if cfg.optim.name not in ("sgd", "adam", "adamw"):
        refuse(f"optim.name={cfg.optim.name!r} is not capturable (torch.optim's sgd, adam and adamw are)")
    if cfg.optim.name == "sgd" and cfg.optim.schedule != "constant":
        refuse(f"optim.name='sgd' reads its lr on the host, so it needs optim.schedule='constant' "
               f"(got {cfg.optim.schedule!r}); adam and adamw take any schedule")
