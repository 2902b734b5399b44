"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880) around one sublayer.

The residual state of a token is M streams of width D, `streams: [B, T, M, D]`. Each sublayer
(attention, FFN/MoE, ...) gets its own `HyperConnection`; the embedding is replicated into the streams
once (`expand_streams`) and collapsed once before the final norm and the LM head (`HeadCollapse`).

Conventions (mHC paper §4; docs/model.md, 'Rules the code follows', rules M1-M9):

* `H_res[k, j]` weights input stream j into output stream k:
  `x'_k = post_k * F(u) + sum_j H_res[k, j] * x_j`, with `u = sum_k pre_k * x_k`.
* `sinkhorn(logits)` takes logits in these same H_res coordinates and returns H_res itself. It is the
  paper's Eq. 9 (M0 = exp(logits), then column-normalise / row-normalise, t_max times), computed with
  the shipped epsilon recipe. The last operation normalises rows, so every row of H_res sums to 1
  (forward gain 1, up to eps); column sums (backward gain) are only approximately 1.
* Transpose trap: DeepSeek's kernels (TileKernels, V4 `hc_split_sinkhorn`) store `comb = H_res^T`,
  softmax over the last axis of the *comb* logits, and apply `sum_j comb[j, k] x_j`. Applying their
  `comb` without the transpose silently conserves the column (backward) gain instead of the row gain.
  Here no `comb` exists: the res block of the logits is read row-major as `H_res` logits `[k, j]`.
  (Loading DeepSeek mHC weights would need the res rows of `phi` and `bias` permuted: our row
  `2M + k*M + j` is their row `2M + j*M + k`.)
* Logit layout of the fused projection: `[pre (M) | post (M) | res (M*M, row-major [k, j])]`; the
  three gating scalars `alpha` are ordered (pre, post, res).
* All coefficient maths runs in fp32 (or fp64 when the input or parameters are fp64) with autocast
  disabled; the weighted sums are accumulated in that dtype and cast back to the streams' dtype.
* `num_streams == 1` is a plain pre-norm residual network: the modules have no parameters and
  `x' = x + F(x)`; the sublayer brings its own RMSNorm in every case.
* Init: `bias = 0`, `alpha = alpha_init`, `phi ~ N(0, phi_init_std^2)`. `phi` must be random: with
  `phi = 0` and a permutation-symmetric bias the model is equivariant under permuting the streams, the
  replicated streams stay identical forever and mHC degenerates to M = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .config import HyperConnectionConfig
from .recompute import cheap, recomputing, selective_active

__all__ = ["HeadCollapse", "HyperConnection", "expand_streams", "sinkhorn"]


def _sinkhorn_loop(logits: Tensor, iters: int, eps: float, tape: list[Tensor] | None = None) -> Tensor:
    """Shipped Sinkhorn recipe in H_res coordinates, tokens last: logits [M (k), M (j), N] -> H_res, same.

    Tokens-last makes every row/column sum a sum of M contiguous length-N vectors (vectorised) instead of
    N strided reductions over M = 4 elements: ~3x faster on the CPU. With `tape`, appends what the analytic
    backward needs: the column softmax, then for each normalisation its output and denominator (sum + eps).
    """
    h = torch.softmax(logits, dim=0)  # exp fused with the first column normalisation
    if tape is not None:
        tape.append(h)
    h = h + eps
    for i in range(2 * iters - 1):  # row, then (column, row) x (iters - 1)
        denom = h.sum(dim=1 if i % 2 == 0 else 0, keepdim=True).add_(eps)
        h = h / denom
        if tape is not None:
            tape += [h, denom]
    return h


def _tokens_last(x: Tensor) -> Tensor:
    """[..., M, M] -> [M, M, N] (contiguous)."""
    m = x.shape[-1]
    return x.reshape(x.shape[:-2].numel(), m, m).permute(1, 2, 0).contiguous()


def _tokens_first(x: Tensor, shape: torch.Size) -> Tensor:
    """[M, M, N] -> `shape` ([..., M, M])."""
    return x.permute(2, 0, 1).reshape(shape)


class _SinkhornFunction(torch.autograd.Function):
    """Sinkhorn that saves only its logits; backward re-runs the loop and applies the analytic
    vector-Jacobian products of its steps in reverse (mHC §4.3): for out = h / (sum(h) + eps),
    dh = (g - sum(g * out)) / (sum(h) + eps); for the column softmax s, dlogits = s * (g - sum(g * s))."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int, eps: float) -> Tensor:
        flat = _tokens_last(logits)
        ctx.save_for_backward(flat)
        ctx.iters, ctx.eps, ctx.shape = iters, eps, logits.shape
        return _tokens_first(_sinkhorn_loop(flat, iters, eps), logits.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (flat,) = ctx.saved_tensors
        tape: list[Tensor] = []
        _sinkhorn_loop(flat, ctx.iters, ctx.eps, tape)
        g = _tokens_last(grad_out)
        for i in reversed(range(2 * ctx.iters - 1)):
            out, denom = tape[1 + 2 * i], tape[2 + 2 * i]
            g = (g - (g * out).sum(dim=1 if i % 2 == 0 else 0, keepdim=True)) / denom
        soft = tape[0]
        return _tokens_first(soft * (g - (g * soft).sum(dim=0, keepdim=True)), ctx.shape), None, None


def sinkhorn(logits: Tensor, iters: int, eps: float, recompute_backward: bool = True) -> Tensor:
    """Project logits onto (approximately) doubly stochastic matrices; returns H_res.

    logits: [..., M, M] in H_res coordinates ([k, j]: input j -> output k). Returns H_res of the same
    shape and dtype whose rows sum to 1 (up to eps) and whose columns sum to about 1. Recipe: column
    softmax + eps, row normalisation, then (iters - 1) x (column, row) normalisations, each dividing by
    (sum + eps): `iters` column and `iters` row normalisations in all, equal to Eq. 9 of the paper.
    With `recompute_backward` (default) only the logits are kept for backward, which re-runs the loop;
    otherwise autograd tapes every iteration.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects logits [..., M, M], got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    if recompute_backward and torch.is_grad_enabled() and logits.requires_grad:
        return _SinkhornFunction.apply(logits, iters, eps)
    return _tokens_first(_sinkhorn_loop(_tokens_last(logits), iters, eps), logits.shape)


def expand_streams(x: Tensor, num_streams: int) -> Tensor:
    """Replicate the embedding into the residual streams. x: [B, T, D] -> [B, T, M, D]."""
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    if num_streams == 1:
        return x.unsqueeze(2)
    return x.unsqueeze(2).expand(-1, -1, num_streams, -1).contiguous()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 if any tensor is fp64 (used by the fp64 reference tests)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_streams(streams: Tensor, num_streams: int, hidden_size: int) -> None:
    if streams.dim() != 4 or streams.shape[2] != num_streams or streams.shape[3] != hidden_size:
        raise ValueError(
            f"expected streams [B, T, {num_streams}, {hidden_size}], got shape {tuple(streams.shape)}"
        )


def _validate(hidden_size: int, cfg: HyperConnectionConfig) -> None:
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    if cfg.num_streams < 1:
        raise ValueError(f"hyper_connections.num_streams must be >= 1, got {cfg.num_streams}")
    if cfg.sinkhorn_iters < 1:
        raise ValueError(f"hyper_connections.sinkhorn_iters must be >= 1, got {cfg.sinkhorn_iters}")
    if cfg.eps < 0:
        raise ValueError(f"hyper_connections.eps must be >= 0, got {cfg.eps}")


class _StreamMixing(nn.Module):
    """The parameters every stream-mixing module has, for M = `num_streams` > 1 (none when M == 1), fp32:
    `phi` [n_out, M*D] ~ N(0, phi_init_std^2), `bias` [n_out] = 0, `alpha` [n_alpha] = alpha_init."""

    def __init__(self, hidden_size: int, cfg: HyperConnectionConfig, n_out: int, n_alpha: int) -> None:
        super().__init__()
        _validate(hidden_size, cfg)
        self.hidden_size = hidden_size
        self.num_streams = cfg.num_streams
        self.eps = cfg.eps
        self.alpha_init = cfg.alpha_init
        self.phi_init_std = cfg.phi_init_std
        m = cfg.num_streams
        if m > 1:
            self.phi = nn.Parameter(torch.empty(n_out, m * hidden_size, dtype=torch.float32))
            self.bias = nn.Parameter(torch.empty(n_out, dtype=torch.float32))
            self.alpha = nn.Parameter(torch.empty(n_alpha, dtype=torch.float32))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """phi ~ N(0, phi_init_std^2), bias = 0, alpha = alpha_init."""
        if self.num_streams == 1:
            return
        with torch.no_grad():
            nn.init.normal_(self.phi, mean=0.0, std=self.phi_init_std)
            self.bias.zero_()
            self.alpha.fill_(self.alpha_init)


class HyperConnection(_StreamMixing):
    """One mHC layer around one sublayer (attention, FFN/MoE, or an Engram sublayer).

    Parameters (fp32; keep them fp32 when the rest of the model is cast to bf16):
    `phi` [M*M + 2M, M*D], `bias` [M*M + 2M], `alpha` [3]. None when `num_streams == 1`.
    Set `track_stats = True` to record detached coefficient statistics in `last_stats` on each forward.
    """

    def __init__(self, hidden_size: int, cfg: HyperConnectionConfig, layer_index: int = 0) -> None:
        m = cfg.num_streams
        super().__init__(hidden_size, cfg, n_out=m * m + 2 * m, n_alpha=3)
        self.sinkhorn_iters = cfg.sinkhorn_iters
        self.layer_index = layer_index
        self.track_stats = False
        self.last_stats: dict[str, Tensor] = {}

    def coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """streams: [B, T, M, D] -> h_pre [B, T, M], h_post [B, T, M], h_res [B, T, M, M] (fp32).

        h_res[..., k, j] weights input stream j into output stream k; its rows sum to 1.
        """
        _check_streams(streams, self.num_streams, self.hidden_size)
        b, t, m, _ = streams.shape
        if m == 1:
            dtype = _compute_dtype(streams)
            ones = streams.new_ones((b, t, 1), dtype=dtype)
            return ones, ones, ones.unsqueeze(-1)
        dtype = _compute_dtype(streams, self.phi)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            x_flat = streams.reshape(b, t, m * self.hidden_size).to(dtype)  # [B, T, M*D]
            phi, bias, alpha = self.phi.to(dtype), self.bias.to(dtype), self.alpha.to(dtype)
            inv_rms = torch.rsqrt(x_flat.square().mean(dim=-1, keepdim=True) + self.eps)
            mixes = (x_flat @ phi.t()) * inv_rms  # [B, T, M*M + 2M]
            h_pre = torch.sigmoid(alpha[0] * mixes[..., :m] + bias[:m]) + self.eps
            h_post = 2.0 * torch.sigmoid(alpha[1] * mixes[..., m : 2 * m] + bias[m : 2 * m])
            res_logits = alpha[2] * mixes[..., 2 * m :] + bias[2 * m :]
            h_res = sinkhorn(res_logits.reshape(b, t, m, m), self.sinkhorn_iters, self.eps)
        return h_pre, h_post, h_res

    def forward(self, streams: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """streams: [B, T, M, D]; sublayer: [B, T, D] -> [B, T, D] (applies its own norm).

        Returns the new streams [B, T, M, D] in the input dtype:
        x'_k = post_k * sublayer(sum_i pre_i x_i) + sum_j H_res[k, j] x_j.
        """
        _check_streams(streams, self.num_streams, self.hidden_size)
        if self.num_streams == 1:
            return streams + _checked(sublayer, streams[:, :, 0]).unsqueeze(2)
        if selective_active():  # selective recompute: the coefficients are recomputed, never saved
            u = cheap(lambda s: self._pre_mix(self.coefficients(s)[0], s), streams, module=self)
            y = _checked(sublayer, u)
            return cheap(lambda s, y_: self._post_mix(*self.coefficients(s), s, y_), streams, y, module=self,
                         keep_output=True)
        h_pre, h_post, h_res = self.coefficients(streams)
        y = _checked(sublayer, self._pre_mix(h_pre, streams))
        return self._post_mix(h_pre, h_post, h_res, streams, y)

    @staticmethod
    def _pre_mix(h_pre: Tensor, streams: Tensor) -> Tensor:
        """The sublayer input u = sum_i pre_i x_i [B, T, D] in the streams' dtype."""
        with torch.autocast(device_type=streams.device.type, enabled=False):
            return torch.einsum("btm,btmd->btd", h_pre, streams.to(h_pre.dtype)).to(streams.dtype)

    def _post_mix(self, h_pre: Tensor, h_post: Tensor, h_res: Tensor, streams: Tensor, y: Tensor) -> Tensor:
        """x'_k = post_k * y + sum_j H_res[k, j] x_j [B, T, M, D] in the streams' dtype."""
        dtype = h_pre.dtype
        with torch.autocast(device_type=streams.device.type, enabled=False):
            mixed = torch.einsum("btkj,btjd->btkd", h_res, streams.to(dtype))
            out = h_post.unsqueeze(-1) * y.to(dtype).unsqueeze(2) + mixed  # [B, T, M, D]
        if self.track_stats and not recomputing():
            self.last_stats = _coefficient_stats(h_pre, h_post, h_res)
        return out.to(streams.dtype)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_streams={self.num_streams}, "
            f"sinkhorn_iters={self.sinkhorn_iters}, layer_index={self.layer_index}"
        )


def _checked(sublayer: Callable[[Tensor], Tensor], u: Tensor) -> Tensor:
    """sublayer(u), which must keep u's shape."""
    y = sublayer(u)
    if y.shape != u.shape:
        raise ValueError(f"sublayer must map {tuple(u.shape)} to the same shape, got {tuple(y.shape)}")
    return y


@torch.no_grad()
def _coefficient_stats(h_pre: Tensor, h_post: Tensor, h_res: Tensor) -> dict[str, Tensor]:
    """Detached 0-dim statistics of one layer's coefficients (no host sync)."""
    return {
        "pre_min": h_pre.min(),
        "pre_max": h_pre.max(),
        "post_min": h_post.min(),
        "post_max": h_post.max(),
        "res_min": h_res.min(),
        "res_max": h_res.max(),
        "res_row_err": (h_res.sum(dim=-1) - 1).abs().max(),
        "res_col_err": (h_res.sum(dim=-2) - 1).abs().max(),
    }


class HeadCollapse(_StreamMixing):
    """Learned pre-only collapse of the streams before the final norm (docs/model.md rule M8).

    The mHC paper does not say how the streams are merged before the head; this is the learned collapse of
    DeepSeek-V4's released inference code (`hc_head`).

    w = sigmoid(alpha * (x_flat @ phi^T) / rms(x_flat) + bias) + eps; h = sum_k w_k x_k.
    Parameters (fp32): `phi` [M, M*D] ~ N(0, phi_init_std^2), `bias` [M] = 0, `alpha` [1] = alpha_init.
    With `num_streams == 1` it has no parameters and returns stream 0.
    """

    def __init__(self, hidden_size: int, cfg: HyperConnectionConfig) -> None:
        super().__init__(hidden_size, cfg, n_out=cfg.num_streams, n_alpha=1)

    def weights(self, streams: Tensor) -> Tensor:
        """streams: [B, T, M, D] -> collapse weights w: [B, T, M] (fp32)."""
        _check_streams(streams, self.num_streams, self.hidden_size)
        b, t, m, _ = streams.shape
        if m == 1:
            return streams.new_ones((b, t, 1), dtype=_compute_dtype(streams))
        dtype = _compute_dtype(streams, self.phi)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            x_flat = streams.reshape(b, t, m * self.hidden_size).to(dtype)
            inv_rms = torch.rsqrt(x_flat.square().mean(dim=-1, keepdim=True) + self.eps)
            mixes = (x_flat @ self.phi.to(dtype).t()) * inv_rms  # [B, T, M]
            return torch.sigmoid(self.alpha.to(dtype) * mixes + self.bias.to(dtype)) + self.eps

    def forward(self, streams: Tensor) -> Tensor:
        """streams: [B, T, M, D] -> h: [B, T, D] in the input dtype."""
        _check_streams(streams, self.num_streams, self.hidden_size)
        if self.num_streams == 1:
            return streams[:, :, 0]
        return cheap(self._collapse, streams)  # recomputed under selective recompute

    def _collapse(self, streams: Tensor) -> Tensor:
        w = self.weights(streams)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            h = torch.einsum("btm,btmd->btd", w, streams.to(w.dtype))
        return h.to(streams.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_streams={self.num_streams}"
