"""Linear CKA with the unbiased HSIC estimator (Song et al. 2012), accumulated over fixed-size minibatches.

Linear CKA of Kornblith et al. 2019, as in the Engram paper's Eq. 8 (docs/model.md rules A2-A4). For
representations X: [n, p] and Y: [n, q] of the same n examples, K = XXᵀ, L = YYᵀ and

    CKA = HSIC₁(K, L) / sqrt(HSIC₁(K, K) · HSIC₁(L, L)).

HSIC₁ is computed in its U-centred form (Székely & Rizzo 2014): zero the diagonal of K, subtract
μ_i = rowsum_i/(n-2) - total/(2(n-1)(n-2)) from row i and column i, zero the diagonal again; then
HSIC₁(K, L) = <K^U, L^U>_F / (n(n-3)). `hsic_unbiased` / `cka_unbiased` are the direct formula (used as
the reference). Minibatch CKA (Nguyen et al. 2021) sums HSIC₁ over k minibatches of the same size n
before normalising: Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MIN_EXAMPLES = 4
"""The unbiased estimator divides by n(n-3) and (n-1)(n-2): it needs n >= 4."""


def _check_n(n: int) -> None:
    if n < MIN_EXAMPLES:
        raise ValueError(f"unbiased HSIC needs at least {MIN_EXAMPLES} examples, got {n}")


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """x: [n, p] -> linear Gram matrix XXᵀ: [n, n] in fp64."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return x @ x.T


def u_centre(gram: torch.Tensor) -> torch.Tensor:
    """U-centred Gram matrix [n, n] (fp64): <u_centre(K), u_centre(L)> / (n(n-3)) is HSIC₁(K, L)."""
    n = gram.shape[0]
    _check_n(n)
    k = gram.to(torch.float64).clone()
    k.fill_diagonal_(0.0)
    means = k.sum(dim=1) / (n - 2) - k.sum() / (2 * (n - 1) * (n - 2))  # [n]
    k -= means[:, None]
    k -= means[None, :]
    k.fill_diagonal_(0.0)
    return k


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 (L is the paper's name)
    """Song et al.'s unbiased HSIC₁ of two Gram matrices [n, n], by the direct formula (fp64)."""
    n = k.shape[0]
    _check_n(n)
    kt = k.to(torch.float64).clone()
    lt = l.to(torch.float64).clone()
    kt.fill_diagonal_(0.0)
    lt.fill_diagonal_(0.0)
    ones = torch.ones(n, dtype=torch.float64, device=kt.device)
    trace = torch.sum(kt * lt.T)  # tr(K̃ L̃)
    middle = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return float((trace + middle - last) / (n * (n - 3)))


def cka_unbiased(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of x: [n, p] and y: [n, q] with unbiased HSIC (Song's formula, one batch of n examples)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    k, l = gram_linear(x), gram_linear(y)  # noqa: E741
    return hsic_unbiased(k, l) / float(np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l)))


class MinibatchCKA:
    """Cross-model linear CKA matrix [La, Lb] accumulated over minibatches of exactly `minibatch_size` tokens.

    `update(feats_a, feats_b)` takes one minibatch (every layer's [n, D] features of the same n examples).
    `add(feats_a, feats_b)` takes any number of examples, runs `update` on each full minibatch and keeps the
    remainder for the next call; a remainder left at the end is dropped (the estimator needs a fixed n).
    Accumulators are fp64 on the features' device.
    """

    def __init__(self, num_layers_a: int, num_layers_b: int, minibatch_size: int = 256) -> None:
        if num_layers_a < 1 or num_layers_b < 1:
            raise ValueError(f"need at least one layer per model, got {num_layers_a} and {num_layers_b}")
        _check_n(minibatch_size)
        self.num_layers_a = num_layers_a
        self.num_layers_b = num_layers_b
        self.minibatch_size = minibatch_size
        self.num_minibatches = 0
        self._cross: torch.Tensor | None = None  # [La, Lb] Σ_b HSIC₁(K_i, L_j)
        self._self_a: torch.Tensor | None = None  # [La] Σ_b HSIC₁(K_i, K_i)
        self._self_b: torch.Tensor | None = None  # [Lb]
        self._pending_a: list[torch.Tensor] = []
        self._pending_b: list[torch.Tensor] = []

    def _centred(self, feats: Sequence[torch.Tensor], expected: int, name: str) -> torch.Tensor:
        """Flattened U-centred Grams [L, n*n] of one model's layers."""
        if len(feats) != expected:
            raise ValueError(f"model {name}: expected {expected} layers, got {len(feats)}")
        n = self.minibatch_size
        for f in feats:
            if f.shape[0] != n:
                raise ValueError(f"model {name}: minibatch holds {f.shape[0]} examples, expected {n}")
        return torch.stack([u_centre(gram_linear(f)).flatten() for f in feats])

    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> None:
        """One minibatch: feats_a[i]: [n, D_a], feats_b[j]: [n, D_b] (n = minibatch_size, same examples)."""
        ka = self._centred(feats_a, self.num_layers_a, "a")  # [La, n*n]
        kb = self._centred(feats_b, self.num_layers_b, "b")  # [Lb, n*n]
        scale = 1.0 / (self.minibatch_size * (self.minibatch_size - 3))
        cross, self_a, self_b = (ka @ kb.T) * scale, (ka * ka).sum(1) * scale, (kb * kb).sum(1) * scale
        if self._cross is None:
            self._cross, self._self_a, self._self_b = cross, self_a, self_b
        else:
            self._cross += cross.to(self._cross.device)
            self._self_a += self_a.to(self._self_a.device)
            self._self_b += self_b.to(self._self_b.device)
        self.num_minibatches += 1

    def add(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> int:
        """Append examples (feats_a[i]: [N, D_a], feats_b[j]: [N, D_b]); returns the minibatches processed."""
        if len(feats_a) != self.num_layers_a or len(feats_b) != self.num_layers_b:
            raise ValueError(f"expected {self.num_layers_a} + {self.num_layers_b} layers, "
                             f"got {len(feats_a)} + {len(feats_b)}")
        sizes = {f.shape[0] for f in (*feats_a, *feats_b)}
        if len(sizes) != 1:
            raise ValueError(f"every layer of both models must hold the same examples, got row counts "
                             f"{sizes}")
        if self._pending_a:
            feats_a = [torch.cat([p, f]) for p, f in zip(self._pending_a, feats_a, strict=True)]
            feats_b = [torch.cat([p, f]) for p, f in zip(self._pending_b, feats_b, strict=True)]
        total, n, done = feats_a[0].shape[0], self.minibatch_size, 0
        for start in range(0, total - n + 1, n):
            self.update([f[start:start + n] for f in feats_a], [f[start:start + n] for f in feats_b])
            done += 1
        rest = done * n
        self._pending_a = [f[rest:].clone() for f in feats_a] if rest < total else []
        self._pending_b = [f[rest:].clone() for f in feats_b] if rest < total else []
        return done

    @property
    def pending(self) -> int:
        """Examples waiting for a full minibatch (dropped if no more come)."""
        return self._pending_a[0].shape[0] if self._pending_a else 0

    def hsic(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cross [La, Lb], self_a [La], self_b [Lb]): mean unbiased HSIC₁ per minibatch."""
        if self._cross is None:
            raise ValueError("MinibatchCKA: no full minibatch was accumulated")
        assert self._self_a is not None and self._self_b is not None
        k = self.num_minibatches
        return ((self._cross / k).cpu().numpy(), (self._self_a / k).cpu().numpy(),
                (self._self_b / k).cpu().numpy())

    def result(self) -> np.ndarray:
        """CKA matrix [La, Lb] (fp64): row i = layer i of model a, column j = layer j of model b."""
        cross, self_a, self_b = self.hsic()
        return cross / np.sqrt(np.outer(self_a, self_b))


def soft_alignment(similarity: np.ndarray, top: int = 5,
                   row_layers: Sequence[float] | None = None) -> np.ndarray:
    """Soft alignment index a_j = Σ_{i ∈ top_i S[:, j]} S_ij · i / Σ_{i ∈ top} S_ij per column j: [Lb].

    `row_layers` are the layer indices of the rows (default 0..La-1). `top` is capped at the row count.
    A column whose top values sum to <= 0 gets NaN.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarity must be a 2-D matrix, got shape {s.shape}")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    rows = np.arange(s.shape[0], dtype=np.float64) if row_layers is None else np.asarray(row_layers, float)
    if rows.shape != (s.shape[0],):
        raise ValueError(f"row_layers has {rows.shape[0]} entries for {s.shape[0]} rows")
    k = min(top, s.shape[0])
    idx = np.argsort(-s, axis=0, kind="stable")[:k]  # [k, Lb] rows of the k largest values per column
    vals = np.take_along_axis(s, idx, axis=0)  # [k, Lb]
    weight = vals.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (vals * rows[idx]).sum(axis=0) / weight
    return np.where(weight > 0, out, np.nan)
