"""Muon with AdamW for the rest, as one client optimizer for DeepSpeed.

Moonlight semantics (Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982; docs/model.md,
'Rules the code follows', rule O5).

Groups with `use_muon=True` (hidden matrices, see `param_groups.param_groups_for`) take the Muon step; the
others take AdamW. For a Muon parameter W (2-D [A, B], or 3-D [E, A, B] = E separate matrices, e.g. the
routed experts, each orthogonalised and scaled on its own) with gradient G:

    M  = mu * M + G                        # momentum (sum form), mu = 0.95
    U  = G + mu * M   (Nesterov) or M
    O  = NS5(U)                            # per matrix; fp32 (fp64 for fp64 params) unless ns_dtype is set
    W  = W * (1 - lr * wd)                 # decoupled decay with the unscaled lr
    W  = W - lr * 0.2 * sqrt(max(A, B)) * O   # update RMS ~ 0.2 * lr, so AdamW's lr and wd carry over

NS5: X = U / (||U||_F + 1e-7) (transposed to be wide), 5 x { P = X X^T; X = a X + (b P + c P^2) X } with
(a, b, c) = (3.4445, -4.7750, 2.0315); singular values end up in about [0.5, 1.5] rather than at 1.
`torch.optim.Muon(adjust_lr_fn="match_rms_adamw")` is the same rule with an EMA momentum (a constant factor
that NS normalises away) and NS in bf16.

DeepSpeed: DeepSpeed 0.19's built-in Muon (`"optimizer": {"type": "Muon"}`) is not used because (i) it
scales by sqrt(max(1, A/B)) (Keller Jordan), not Moonlight's 0.2 * sqrt(max(A, B)), so AdamW's lr does not
carry over; (ii) `deepspeed.initialize` re-tags `use_muon` on every parameter by name and shape (>= 2-D and
not `embed`/`lm_head`), which puts the router, the mHC phi and the depthwise Engram conv [C, 1, K] on Muon;
(iii) under ZeRO-1/2 with gradient clipping (its default 1.0) the global norm and the clip are taken over
the orthogonalised updates instead of the gradients, shrinking every update by 1/||updates||. This class
needs the full matrices: it works as a client optimizer with ZeRO stage 0 in fp32 (the engine all-reduces
the gradients and calls `step` directly). ZeRO-1/2/3 and DeepSpeed's bf16 optimizer hand the client
optimizer flat 1-D partitions, which `step` rejects with a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
MUON_RMS_SCALE = 0.2


def newton_schulz5(g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                   dtype: torch.dtype | None = None) -> Tensor:
    """Approximate orthogonalisation U S' V^T of every matrix of `g: [..., A, B]` (batched over leading
    dims), computed in `dtype` (default fp32, fp64 for fp64 input) and returned in g's dtype."""
    if g.dim() < 2:
        raise ValueError(f"newton_schulz5 needs matrices [..., A, B], got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype or torch.promote_types(g.dtype, torch.float32))
    wide = g.size(-2) <= g.size(-1)
    if not wide:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    for _ in range(steps):
        p = x @ x.mT
        x = a * x + (b * p + c * (p @ p)) @ x
    if not wide:
        x = x.mT
    return x.to(g.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """0.2 * sqrt(max(A, B)) of the matrix shape [..., A, B] (per expert for [E, A, B])."""
    return MUON_RMS_SCALE * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True`, AdamW for the others (see the module docstring).

    Group keys: Muon `lr, weight_decay, momentum, nesterov, ns_steps`; AdamW `lr, weight_decay, betas, eps`.
    A step with any non-finite gradient is skipped and sets `overflow` (DeepSpeed reads it at ZeRO-0).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_dtype: torch.dtype | None = None) -> None:
        if lr < 0 or weight_decay < 0 or eps < 0:
            raise ValueError(f"Muon: lr={lr}, weight_decay={weight_decay}, eps={eps} must be >= 0")
        if not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon: momentum={momentum} must be in [0, 1) and ns_steps={ns_steps} >= 1")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(betas), eps=eps, use_muon=True)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        self.overflow = False
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    self._check_matrix(p, group)

    @staticmethod
    def _check_matrix(p: Tensor, group: dict[str, Any]) -> None:
        if p.dim() not in (2, 3):
            raise ValueError(f"Muon group '{group.get('name', '?')}' holds a parameter of shape "
                             f"{tuple(p.shape)}: Muon needs full 2-D matrices or 3-D [E, A, B] expert "
                             "stacks. A flat 1-D tensor means DeepSpeed partitioned it (ZeRO >= 1 or its "
                             "bf16 optimizer): run Muon with ZeRO stage 0 in fp32, or optimizer.name=adamw")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return loss
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check_matrix(p, group)
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            update = g.add(buf, alpha=mu) if group["nesterov"] else buf
            ortho = newton_schulz5(update, steps=group["ns_steps"], dtype=self.ns_dtype)
            p.mul_(1.0 - lr * wd)
            p.add_(ortho, alpha=-lr * muon_scale(p.shape))

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / math.sqrt(1.0 - b2**t)).add_(eps)
            p.mul_(1.0 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1.0 - b1**t))
