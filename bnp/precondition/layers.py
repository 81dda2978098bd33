"""Which modules BNP tracks, and how one tracked layer's weight lines up with its input statistics."""

from __future__ import annotations

import enum
import fnmatch
import weakref
from collections.abc import Iterable

import torch
from torch import nn

TRACKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_unclaimed(layers: Iterable[tuple[str, nn.Module]], who: str) -> None:
    """One preconditioner per layer: a second one (BNP or FullCovariance) would precondition the
    gradients twice, or with BNP(fast=True) leave the first one inert. A preconditioner's hooks and
    forwards say so by a ``preconditions_layer`` attribute (of the object or of a bound method's owner)."""
    for name, module in layers:
        for hook in (vars(module).get("forward"), *module._forward_pre_hooks.values()):
            if getattr(hook, "preconditions_layer", False) or getattr(getattr(hook, "__self__", None),
                                                                        "preconditions_layer", False):
                raise RuntimeError(
                    f"{who}: layer {name!r} is already preconditioned by another BNP or FullCovariance instance "
                    "(a deep copy of a model carries a copy of its preconditioner along); call remove() on that "
                    "one first, or build one preconditioner per model")


class GradState(enum.Enum):
    """Where a layer's gradients stand within the current step (every step() resets it to FRESH)."""

    FRESH = "fresh"  # no fast forward yet this step: any gradient is raw, step() preconditions it
    IN_FLIGHT = "in flight"  # one fast forward ran: its backward makes the gradients (raw during warmup)
    PRECONDITIONED = "preconditioned"  # a fast backward made them preconditioned: step() leaves them
    REFERENCE = "reference"  # handed to the reference path this step: raw, step() preconditions them


class _Seen(enum.Enum):
    NOTHING = "nothing"  # an enum member: a deep copy of a model keeps it the same object


UNSEEN = _Seen.NOTHING  # no training forward since the last step()


def _token(grad: torch.Tensor | None) -> tuple | None:
    """A gradient's identity and in-place version, held weakly (None: no gradient)."""
    return None if grad is None else (weakref.ref(grad), grad._version)


def _same(token: tuple | None, grad: torch.Tensor | None) -> bool:
    """Whether ``grad`` is the very gradient ``token`` was taken of, unedited since."""
    if token is None or grad is None:
        return token is None and grad is None
    return token[0]() is grad and token[1] == grad._version


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf Linear / Conv{1,2,3}d modules with a trainable weight, by qualified name. Not the
    out_proj of an nn.MultiheadAttention: it uses that Linear's weight without calling its forward,
    so the layer would never see an input."""
    inside_attention = {f"{name}.out_proj" if name else "out_proj" for name, module in model.named_modules()
                        if isinstance(module, nn.MultiheadAttention)}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TRACKED_TYPES)
        and not any(True for _ in module.children())
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.requires_grad
        and name not in inside_attention
    }


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(type(module).__name__, pattern)


ENDS = {"@first": 0, "@last": -1}  # skip patterns for the first / last layer in model order


def resolve_ends(names: list[str], skip: tuple) -> tuple:
    """``skip`` with ``@first`` / ``@last`` replaced by the first / last of the candidate ``names``."""
    return tuple(names[ENDS[p]] if names and isinstance(p, str) and p in ENDS else p for p in skip)


def discover(model: nn.Module, skip: tuple[str, ...]) -> list[Layer]:
    """The tracked layers of ``model``, in model order, less those ``skip`` matches (each pattern
    must match a layer; ``@first`` and ``@last`` name the first and last candidate layer)."""
    found = candidates(model)
    skip = resolve_ends(list(found), skip)
    for pattern in skip:
        if not isinstance(pattern, str):
            raise ValueError(f"BNP: skip patterns must be strings, got {pattern!r}")
        if not any(matches(pattern, n, m) for n, m in found.items()):
            raise ValueError(f"BNP: skip pattern {pattern!r} matches no layer; layers that can be skipped: {sorted(found)}")
    layers, offset = [], 0
    for name, module in found.items():
        if any(matches(p, name, module) for p in skip):
            continue
        layers.append(Layer(name, module, offset, index=len(layers)))
        offset += layers[-1].features
    if not layers:
        raise ValueError("BNP: nothing to precondition: the model has no Linear/Conv1d/2d/3d layer with a "
                         f"trainable weight left after skip={list(skip)}")
    return layers


def untracked(model: nn.Module, layers: list[Layer]) -> dict[str, tuple[str, list[str]]]:
    """Trainable parameters BNP leaves to the optimizer, by owning module:
    {module name: (class name, [parameter names])}."""
    mine = {id(p) for layer in layers for p in (layer.weight, layer.trained_bias) if p is not None}
    owners = dict(model.named_modules())
    found: dict[str, tuple[str, list[str]]] = {}
    for full, param in model.named_parameters():
        if param.requires_grad and id(param) not in mine:
            module, _, name = full.rpartition(".")
            found.setdefault(module, (type(owners[module]).__name__, []))[1].append(name)
    return found


def skip_patterns(skip: str | Iterable[str]) -> tuple[str, ...]:
    return (skip,) if isinstance(skip, str) else tuple(skip)


class Layer:
    """One tracked module: its shapes, where its statistics sit in the flat buffers (the views are
    bound by RunningStats, which alone changes ``batches`` and ``pending``), and its gradients' state."""

    def __init__(self, name: str, module: nn.Module, offset: int, index: int):
        weight = module.weight
        bias = getattr(module, "bias", None)
        self.name, self.module, self.weight, self.index = name, module, weight, index
        self.bias = bias if isinstance(bias, torch.Tensor) else None  # what the forward adds
        self.trained_bias = self.bias if self.bias is not None and self.bias.requires_grad else None
        self.dense = isinstance(module, nn.Linear)
        self.groups = 1 if self.dense else module.groups
        self.features = module.in_features if self.dense else module.in_channels
        self.in_per_group = self.features // self.groups
        self.spatial_dims = weight.dim() - 2  # 0 for Linear
        # How W, b and the per-input-channel statistics line up for broadcasting:
        # Linear (out, in); Conv (out, in, kernel); grouped Conv (groups, out/g, in/g, kernel).
        if self.dense:
            self.shape_w, self.shape_b, self.shape_stats = (-1, self.features), (-1, 1), (1, -1)
        elif self.groups == 1:
            self.shape_w, self.shape_b, self.shape_stats = (weight.shape[0], self.features, -1), (-1, 1, 1), (1, -1, 1)
        else:
            self.shape_w = (self.groups, weight.shape[0] // self.groups, self.in_per_group, -1)
            self.shape_b, self.shape_stats = (self.groups, -1, 1, 1), (self.groups, 1, -1, 1)
        self.offset = offset
        self.span = slice(offset, offset + self.features)
        self.mean = self.var = self.mean_w = None  # views into the flat buffers
        self.batches = 0  # training forward passes folded in; 0: no statistics yet
        self.pending: torch.Tensor | None = None  # an input seen by the forward, not yet folded in
        self.fast = False  # BNP(fast=True) on a Linear: gradients straight from backward
        self.handle = None  # the forward pre-hook (reference path)
        self.state = GradState.FRESH
        self.grad_mark = None  # the weight gradient the last step() left, as (weak reference, version)
        self.grad_at_forward = UNSEEN  # the weight gradient the step's first training forward found

    @property
    def preconditions_in_step(self) -> bool:
        """Whether step() must precondition this layer's gradients (they are raw)."""
        return self.state is not GradState.PRECONDITIONED

    def mark_grad(self) -> None:
        """Remember this weight gradient as preconditioned (a weak reference and its version)."""
        self.grad_mark = _token(self.weight.grad)

    def has_new_grad(self) -> bool:
        """A weight gradient that step() has not preconditioned: a new tensor, or one edited in place
        since (autograd accumulating into it, zero_grad(set_to_none=False))."""
        return self.grad_mark is None or not _same(self.grad_mark, self.weight.grad)

    def saw_forward(self) -> None:
        """A training forward ran: remember the weight gradient it found, if it is the step's first."""
        if self.grad_at_forward is UNSEEN:
            self.grad_at_forward = _token(self.weight.grad)

    def backward_since_forward(self) -> bool:
        """Whether the weight gradient changed since the step's first training forward (a backward
        ran after it); True when no forward ran."""
        return self.grad_at_forward is UNSEEN or not _same(self.grad_at_forward, self.weight.grad)

    def describe(self) -> str:
        kind = type(self.module).__name__
        extra = f", groups={self.groups}" if self.groups > 1 else ""
        bias = "" if self.trained_bias is not None else ", no bias"
        return f"{self.name}: {kind}(in={self.features}{extra}{bias})"
