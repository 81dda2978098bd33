"""Condition numbers of the loss Hessian with respect to one dense layer's parameters, with and
without the BNP reparameterization (docs/bnp-method.md, claim 5).

A Linear layer ``h = W a + b`` (W: m x n) has parameters ``theta`` ordered row by row,
``[w_1; b_1; w_2; b_2; ...]`` (each block of n + 1). BNP's reparameterization is ``theta = U_full
theta_hat`` with ``U_full = I_m (x) U`` and, per output row,

    U = [[ diag(D2)^(-1/2),          0 ],      D2 = sigma2 + eps
         [ -mu^T diag(D2)^(-1/2),    1 ]]

so the Hessian with respect to the normalized parameters is exactly ``U_full^T H U_full``.

Small layers: the Hessian is computed exactly (``torch.func.hessian``) and diagonalized. Larger ones:
Lanczos with full reorthogonalization on Hessian-vector products gives the extreme eigenvalues.

Zero eigenvalues are part of the problem, not noise: the softmax cross-entropy is invariant to
adding one vector to every row of the output layer, so its Hessian has an (n+1)-dimensional null
space, and ReLU layers with dead units add more. Every condition number here is therefore
``max |lambda| / min |lambda|`` over the **nonzero** spectrum (|lambda| > rtol * max |lambda|), and
the result reports how many eigenvalues were treated as zero and how many were negative. The default
rtol = 1e-11 sits in the gap seen in float64 between round-off zeros (~1e-16 relative) and the
smallest real eigenvalues of small MLP layers (~1e-7 relative). With Lanczos the smallest nonzero
Ritz value is only an estimate (it converges last, usually from above), so the condition number is
then an estimate that tends to be too small.

Trained hidden layers have eigenvalues spread continuously down to round-off (saturated softmax
outputs, dead ReLUs), where the full-spectrum ratio is set by the threshold rather than by the
problem. ``cond_q10`` = max |lambda| / (10th percentile of the nonzero |lambda|) is reported beside
it as a measure that a handful of near-null directions cannot dominate.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jvp
from torch.nn import functional as F


@dataclass
class Spectrum:
    cond: float  # max |lambda| / min |lambda| over the nonzero spectrum
    cond_q10: float  # max |lambda| / 10th percentile of the nonzero |lambda| (exact spectra only)
    lambda_max: float  # largest |lambda|
    lambda_min_nonzero: float  # smallest |lambda| above the zero threshold
    zeros: int  # eigenvalues (or Ritz values) treated as zero
    negatives: int  # negative eigenvalues above the zero threshold
    size: int  # eigenvalues (exact) or Ritz values (Lanczos) considered
    method: str  # "exact" or "lanczos(k)"


def spectrum(eigenvalues: torch.Tensor, rtol: float = 1e-11, method: str = "exact") -> Spectrum:
    """Condition number over the nonzero part of a (symmetric) spectrum."""
    magnitudes = eigenvalues.abs()
    top = magnitudes.max().item()
    nonzero = magnitudes > rtol * top
    low = magnitudes[nonzero].min().item() if nonzero.any() else math.nan
    q10 = torch.quantile(magnitudes[nonzero], 0.1).item() if nonzero.any() and method == "exact" else math.nan
    return Spectrum(
        cond=top / low if low and not math.isnan(low) else math.inf, cond_q10=top / q10, lambda_max=top,
        lambda_min_nonzero=low,
        zeros=int((~nonzero).sum()), negatives=int(((eigenvalues < 0) & nonzero).sum()),
        size=eigenvalues.numel(), method=method,
    )


# ------------------------------------------------------------------------------------ the layer
def _linear(model: nn.Module, layer: str) -> nn.Linear:
    module = dict(model.named_modules()).get(layer)
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise ValueError(f"layer {layer!r} must be an nn.Linear with a bias (the analysis is for dense layers)")
    return module


def layer_loss(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy):
    """``(f, theta0)``: ``loss_fn(model(x), y)`` as a function of the layer's flat parameters
    (rows of [W | b]), every other parameter fixed. The model is put in eval mode (and stays so):
    BatchNorm uses its running statistics and no training hook sees the analysis batch."""
    module = _linear(model, layer)
    m, n = module.weight.shape
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    theta0 = torch.cat([module.weight.detach(), module.bias.detach()[:, None]], 1).reshape(-1)
    model.eval()

    def f(theta: torch.Tensor) -> torch.Tensor:
        block = theta.view(m, n + 1)
        overrides = {**params, **buffers, f"{layer}.weight": block[:, :n], f"{layer}.bias": block[:, n]}
        return loss_fn(functional_call(model, overrides, (x,)), y)

    return f, theta0


def layer_inputs(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The inputs the layer sees for x (eval mode), as rows."""
    module, seen = _linear(model, layer), []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0].reshape(-1, module.in_features)


# ------------------------------------------------------------------------------------ U
def u_matrix(mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The per-row (n+1) x (n+1) reparameterization matrix U."""
    n = mean.numel()
    inv_sqrt = (var + eps).rsqrt()
    U = torch.zeros(n + 1, n + 1, dtype=mean.dtype, device=mean.device)
    U[:n, :n] = torch.diag(inv_sqrt)
    U[n, :n] = -mean * inv_sqrt
    U[n, n] = 1
    return U


def apply_u(v: torch.Tensor, mean, var, eps, transpose: bool = False) -> torch.Tensor:
    """U_full v (or U_full^T v) without forming U_full: rows of [w | b]."""
    n = mean.numel()
    block = v.view(-1, n + 1)
    w, b = block[:, :n], block[:, n:]
    inv_sqrt = (var + eps).rsqrt()
    if transpose:  # U^T [w; b] = [D^-1/2 (w - mu b); b]
        return torch.cat([(w - b * mean) * inv_sqrt, b], 1).reshape(-1)
    scaled = w * inv_sqrt  # U [w; b] = [D^-1/2 w; b - mu^T D^-1/2 w]
    return torch.cat([scaled, b - (scaled * mean).sum(1, keepdim=True)], 1).reshape(-1)


# ------------------------------------------------------------------------------------ eigenvalues
def lanczos(matvec, dim: int, steps: int, *, dtype=torch.float64, device="cpu", seed: int = 0) -> torch.Tensor:
    """Ritz values of a symmetric operator after ``steps`` Lanczos steps (full reorthogonalization).
    The extremes converge first; with steps >= dim they are the eigenvalues (distinct ones)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for _ in range(min(steps, dim)):
        w = matvec(basis[-1])
        alphas.append(torch.dot(w, basis[-1]).item())
        Q = torch.stack(basis, 1)
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - Q @ (Q.T @ w)
        beta = w.norm().item()
        if beta < 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T)


@dataclass
class LayerConditioning:
    layer: str
    plain: Spectrum  # H
    preconditioned: Spectrum  # U^T H U

    @property
    def improvement(self) -> float:
        return self.plain.cond / self.preconditioned.cond


def layer_conditioning(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, *, mean=None, var=None,
                       eps: float = 1e-2, max_exact: int = 2500, lanczos_steps: int = 120,
                       rtol: float = 1e-11, loss_fn=F.cross_entropy) -> LayerConditioning:
    """cond(H) and cond(U^T H U) for one Linear layer on the batch (x, y), in float64.

    ``mean`` / ``var`` are the BNP statistics of the layer's inputs (e.g. ``pre.stats(layer)``);
    by default the batch statistics of the inputs the layer sees for x. Layers with at most
    ``max_exact`` parameters are diagonalized exactly, larger ones by Lanczos.
    """
    # a float64 copy without hooks (e.g. a BNP attached to the caller's model must not see the
    # analysis batch), in eval mode; the caller's model is left alone
    model = copy.deepcopy(model).double().eval()
    for module in model.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        vars(module).pop("forward", None)  # BNP(fast=True)'s forward: back to the class's own
    x = x.double()
    if mean is None or var is None:
        a = layer_inputs(model, layer, x)
        mean, var = a.mean(0), a.var(0, unbiased=False)
    mean, var = mean.double(), var.double()
    f, theta0 = layer_loss(model, layer, x, y, loss_fn)
    dim = theta0.numel()
    if dim <= max_exact:
        H = hessian(f)(theta0)
        H = (H + H.T) / 2
        U_full = torch.kron(torch.eye(dim // (mean.numel() + 1), dtype=H.dtype), u_matrix(mean, var, eps))
        plain = spectrum(torch.linalg.eigvalsh(H), rtol)
        pre = spectrum(torch.linalg.eigvalsh(U_full.T @ H @ U_full), rtol)
        return LayerConditioning(layer, plain, pre)
    grad_f = grad(f)
    hvp = lambda v: jvp(grad_f, (theta0,), (v,))[1]  # noqa: E731
    pre_hvp = lambda v: apply_u(hvp(apply_u(v, mean, var, eps)), mean, var, eps, transpose=True)  # noqa: E731
    label = f"lanczos({lanczos_steps})"
    plain = spectrum(lanczos(hvp, dim, lanczos_steps), rtol, label)
    pre = spectrum(lanczos(pre_hvp, dim, lanczos_steps), rtol, label)
    return LayerConditioning(layer, plain, pre)
