"""Tests of mHC: Sinkhorn, coefficients, the M = 1 and init equivalences, symmetry, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from engram_pretrain.model.config import HyperConnectionConfig
from engram_pretrain.model.hyper_connections import (
    HeadCollapse,
    HyperConnection,
    expand_streams,
    sinkhorn,
)

F64 = torch.float64


# ---------------------------------------------------------------- references (fp64, plain loops)


def eq9_sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Paper Eq. 9 for one [M, M] matrix: M0 = exp(logits), then columns, then rows, `iters` times."""
    m = logits.shape[0]
    mat = [[math.exp(float(logits[k, j])) for j in range(m)] for k in range(m)]
    for _ in range(iters):
        for j in range(m):
            col = sum(mat[k][j] for k in range(m))
            for k in range(m):
                mat[k][j] /= col
        for k in range(m):
            row = sum(mat[k])
            mat[k] = [v / row for v in mat[k]]
    return torch.tensor(mat, dtype=F64)


def shipped_comb_sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """DeepSeek's kernel recipe for one matrix, in *comb* coordinates, transposed back to H_res.

    comb = H_res^T, so comb logits are logits^T: row-softmax + eps, column normalisation, then
    (iters - 1) x (row, column) normalisations, each dividing by (sum + eps).
    """
    m = logits.shape[0]
    c = [[float(logits[k, j]) for k in range(m)] for j in range(m)]  # c[j][k] = logits[k, j]
    comb = []
    for row in c:
        mx = max(row)
        e = [math.exp(v - mx) for v in row]
        comb.append([v / sum(e) + eps for v in e])

    def norm_rows() -> None:
        for j in range(m):
            s = sum(comb[j]) + eps
            comb[j] = [v / s for v in comb[j]]

    def norm_cols() -> None:
        for k in range(m):
            s = sum(comb[j][k] for j in range(m)) + eps
            for j in range(m):
                comb[j][k] /= s

    norm_cols()
    for _ in range(iters - 1):
        norm_rows()
        norm_cols()
    return torch.tensor(comb, dtype=F64).t()


def eq9_sinkhorn_torch(logits: Tensor, iters: int) -> Tensor:
    """Differentiable Eq. 9 on [..., M, M] (for gradient comparisons)."""
    mat = logits.exp()
    for _ in range(iters):
        mat = mat / mat.sum(dim=-2, keepdim=True)
        mat = mat / mat.sum(dim=-1, keepdim=True)
    return mat


def reference_coefficients(
    streams: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, iters: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token fp64 loop of mHC Eq. 14-19 (docs/model.md rules M3-M5); Sinkhorn is the shipped comb recipe
    (Eq. 9 when eps = 0)."""
    b, t, m, d = streams.shape
    pre = torch.zeros(b, t, m, dtype=F64)
    post = torch.zeros(b, t, m, dtype=F64)
    res = torch.zeros(b, t, m, m, dtype=F64)
    for bi in range(b):
        for ti in range(t):
            x = streams[bi, ti].reshape(m * d).to(F64)
            r = math.sqrt(float((x * x).sum()) / (m * d) + eps)
            mix = [float((phi[i].to(F64) * x).sum()) / r for i in range(m * m + 2 * m)]
            for k in range(m):
                pre[bi, ti, k] = 1 / (1 + math.exp(-(alpha[0] * mix[k] + bias[k]))) + eps
                post[bi, ti, k] = 2 / (1 + math.exp(-(alpha[1] * mix[m + k] + bias[m + k])))
            logits = torch.zeros(m, m, dtype=F64)
            for k in range(m):
                for j in range(m):
                    idx = 2 * m + k * m + j
                    logits[k, j] = alpha[2] * mix[idx] + bias[idx]
            if eps == 0:
                res[bi, ti] = eq9_sinkhorn(logits, iters)
            else:
                res[bi, ti] = shipped_comb_sinkhorn(logits, iters, eps)
    return pre, post, res


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


class TinyFFN(torch.nn.Module):
    """Pre-norm nonlinear sublayer f(norm(u)) with no norm weight."""

    def __init__(self, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(2 * d, d, generator=gen, dtype=F64) / math.sqrt(d))
        self.w2 = torch.nn.Parameter(torch.randn(d, 2 * d, generator=gen, dtype=F64) / math.sqrt(2 * d))

    def forward(self, u: Tensor) -> Tensor:
        return torch.tanh(rms_norm(u) @ self.w1.t()) @ self.w2.t()


def make_cfg(m: int = 4, **kw) -> HyperConnectionConfig:
    return HyperConnectionConfig(num_streams=m, **kw)


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_matches_eq9_without_eps(iters: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 4, 4, generator=gen, dtype=F64)
    out = sinkhorn(logits, iters, eps=0.0)
    for i in range(3):
        torch.testing.assert_close(out[i], eq9_sinkhorn(logits[i], iters), rtol=0, atol=1e-12)


def test_sinkhorn_with_eps_rows_exact_cols_approx() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 5, 4, 4, generator=gen, dtype=F64)
    h_res = sinkhorn(logits, 20, eps=1e-6)
    assert (h_res.sum(dim=-1) - 1).abs().max() < 1.5e-6  # forward gain 1 (rows are normalised last)
    # columns (backward gain) only converge: slowly for wide logit ranges, fast for moderate ones
    assert (h_res.sum(dim=-2) - 1).abs().max() < 0.1
    assert (sinkhorn(logits / 3, 20, eps=1e-6).sum(dim=-2) - 1).abs().max() < 1e-4
    assert h_res.min() > 0
    for idx in [(0, 0), (1, 4), (0, 3)]:
        # exactly the shipped (transposed, comb-coordinate) kernel recipe ...
        want = shipped_comb_sinkhorn(logits[idx], 20, 1e-6)
        torch.testing.assert_close(h_res[idx], want, rtol=0, atol=1e-12)
        # ... and, for moderate logits, Eq. 9 up to the epsilons (which slow convergence amplifies)
        moderate = logits[idx] / 3
        got = sinkhorn(moderate, 20, 1e-6)
        torch.testing.assert_close(got, eq9_sinkhorn(moderate, 20), rtol=0, atol=1e-5)


def test_sinkhorn_of_zeros_is_uniform() -> None:
    h_res = sinkhorn(torch.zeros(4, 4, dtype=F64), 20, eps=1e-6)
    torch.testing.assert_close(h_res, torch.full((4, 4), 0.25, dtype=F64), rtol=0, atol=1e-6)


def test_sinkhorn_custom_backward_gradcheck() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20, 1e-6), (logits,), eps=1e-6, atol=1e-7)


def test_sinkhorn_custom_backward_equals_autograd_through_eq9() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(2, 3, 4, 4, generator=gen, dtype=F64)
    weight = torch.randn(2, 3, 4, 4, generator=gen, dtype=F64)
    a = logits.clone().requires_grad_(True)
    (sinkhorn(a, 20, 0.0) * weight).sum().backward()
    b = logits.clone().requires_grad_(True)
    (eq9_sinkhorn_torch(b, 20) * weight).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    # with the epsilons, the recomputing backward equals autograd through the taped loop
    c = logits.clone().requires_grad_(True)
    (sinkhorn(c, 20, 1e-6) * weight).sum().backward()
    e = logits.clone().requires_grad_(True)
    (sinkhorn(e, 20, 1e-6, recompute_backward=False) * weight).sum().backward()
    torch.testing.assert_close(c.grad, e.grad, rtol=1e-12, atol=1e-14)


def test_sinkhorn_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(3, 4), 20, 1e-6)
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(4, 4), 0, 1e-6)


# ---------------------------------------------------------------- coefficients and the apply convention


def randomise(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    """Non-trivial parameters so that every coefficient is exercised."""
    with torch.no_grad():
        module.phi.copy_(scale * torch.randn(module.phi.shape, generator=gen, dtype=F64))
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=F64))
        module.alpha.copy_(0.5 + torch.rand(module.alpha.shape, generator=gen, dtype=F64))


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_coefficients_match_fp64_reference(eps: float) -> None:
    gen = torch.Generator().manual_seed(4)
    m, d = 3, 5
    hc = HyperConnection(d, make_cfg(m, eps=eps, sinkhorn_iters=20)).double()
    randomise(hc, gen)
    streams = torch.randn(2, 3, m, d, generator=gen, dtype=F64)
    pre, post, res = hc.coefficients(streams)
    assert pre.shape == (2, 3, m) and post.shape == (2, 3, m) and res.shape == (2, 3, m, m)
    ref = reference_coefficients(streams, hc.phi.detach(), hc.bias.detach(), hc.alpha.detach(), 20, eps)
    for got, want in zip((pre, post, res), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_head_collapse_matches_fp64_reference() -> None:
    gen = torch.Generator().manual_seed(13)
    m, d, eps = 3, 5, 1e-6
    head = HeadCollapse(d, make_cfg(m, eps=eps)).double()
    randomise(head, gen)
    streams = torch.randn(2, 3, m, d, generator=gen, dtype=F64)
    phi, bias, alpha = head.phi.detach(), head.bias.detach(), float(head.alpha.detach())
    got = head(streams)
    for bi in range(2):
        for ti in range(3):
            x = streams[bi, ti]
            r = math.sqrt(float(x.square().sum()) / (m * d) + eps)
            w = [1 / (1 + math.exp(-(alpha * float((phi[k] * x.reshape(-1)).sum()) / r + bias[k]))) + eps
                 for k in range(m)]
            torch.testing.assert_close(head.weights(streams)[bi, ti].detach(), torch.tensor(w, dtype=F64),
                                       rtol=0, atol=1e-12)
            want = sum(w[k] * x[k] for k in range(m))
            torch.testing.assert_close(got[bi, ti], want, rtol=0, atol=1e-12)


def test_forward_matches_layer_equation() -> None:
    gen = torch.Generator().manual_seed(5)
    m, d = 4, 6
    hc = HyperConnection(d, make_cfg(m)).double()
    randomise(hc, gen)
    streams = torch.randn(2, 3, m, d, generator=gen, dtype=F64)
    ffn = TinyFFN(d, gen)
    out = hc(streams, ffn)
    pre, post, res = (c.detach() for c in hc.coefficients(streams))
    want = torch.zeros_like(streams)
    for bi in range(2):
        for ti in range(3):
            u = sum(pre[bi, ti, i] * streams[bi, ti, i] for i in range(m))
            y = ffn(u)
            for k in range(m):
                mixed = sum(res[bi, ti, k, j] * streams[bi, ti, j] for j in range(m))
                want[bi, ti, k] = post[bi, ti, k] * y + mixed
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_applied_mixing_rows_sum_to_one() -> None:
    """Pins the transpose convention: new_k = sum_j H_res[k, j] x_j with unit row sums.

    Few Sinkhorn iterations and a strong random bias keep the column sums visibly away from 1, so
    applying H_res^T instead would fail the row check.
    """
    gen = torch.Generator().manual_seed(6)
    m = 4
    hc = HyperConnection(m, make_cfg(m, sinkhorn_iters=1)).double()
    with torch.no_grad():
        hc.phi.zero_()
        hc.bias.copy_(3 * torch.randn(hc.bias.shape, generator=gen, dtype=F64))
    # stream j is the basis vector e_j, so output stream k is row k of the applied matrix
    streams = torch.eye(m, dtype=F64).expand(1, 1, m, m).contiguous()
    out = hc(streams, lambda u: torch.zeros_like(u))[0, 0].detach()  # [k, j]: weight of j into k
    assert (out.sum(dim=-1) - 1).abs().max() < 1e-4  # eps / (pre-normalisation row sum)
    assert (out.sum(dim=-2) - 1).abs().max() > 1e-2  # the check above would catch a transpose
    torch.testing.assert_close(out, hc.coefficients(streams)[2][0, 0].detach(), rtol=0, atol=1e-12)


def test_fp32_coefficients_for_bf16_streams() -> None:
    gen = torch.Generator().manual_seed(7)
    m, d = 4, 8
    hc = HyperConnection(d, make_cfg(m))
    streams = torch.randn(2, 3, m, d, generator=gen).to(torch.bfloat16)
    pre, post, res = hc.coefficients(streams)
    assert pre.dtype == post.dtype == res.dtype == torch.float32
    out = hc(streams, lambda u: u * 2)
    assert out.dtype == torch.bfloat16 and out.shape == streams.shape
    assert HeadCollapse(d, make_cfg(m))(streams).dtype == torch.bfloat16


def test_stats_and_shape_errors() -> None:
    m, d = 4, 8
    hc = HyperConnection(d, make_cfg(m))
    streams = torch.randn(1, 2, m, d)
    hc(streams, lambda u: u)
    assert hc.last_stats == {}
    hc.track_stats = True
    hc(streams, lambda u: u)
    assert hc.last_stats["res_row_err"] < 1e-5 and 0 < hc.last_stats["pre_min"] <= hc.last_stats["pre_max"]
    with pytest.raises(ValueError):
        hc(torch.randn(1, 2, m + 1, d), lambda u: u)
    with pytest.raises(ValueError):
        hc(streams, lambda u: u[..., :-1])
    with pytest.raises(ValueError):
        HyperConnection(d, make_cfg(0))


# ---------------------------------------------------------------- equivalences with residual networks


def test_single_stream_is_plain_residual() -> None:
    gen = torch.Generator().manual_seed(8)
    d, n_layers = 6, 3
    cfg = make_cfg(1)
    layers = [HyperConnection(d, cfg, i) for i in range(n_layers)]
    head = HeadCollapse(d, cfg)
    assert all(len(list(mod.parameters())) == 0 for mod in [*layers, head])
    ffns = [TinyFFN(d, gen) for _ in range(n_layers)]
    x = torch.randn(2, 5, d, generator=gen, dtype=F64)

    streams = expand_streams(x, 1)
    assert streams.shape == (2, 5, 1, d)
    one = layers[0](streams, ffns[0])
    assert torch.equal(one, streams + ffns[0](streams[:, :, 0]).unsqueeze(2))
    for hc, ffn in zip(layers, ffns, strict=True):
        streams = hc(streams, ffn)
    h = head(streams)
    ref = x
    for ffn in ffns:
        ref = ref + ffn(ref)
    assert torch.equal(h, ref)


@pytest.mark.parametrize("neutral", ["phi_zero", "alpha_zero"])
def test_init_equals_prenorm_residual(neutral: str) -> None:
    gen = torch.Generator().manual_seed(9)
    m, d, n_layers = 4, 8, 6
    cfg = make_cfg(m)
    layers = [HyperConnection(d, cfg, i).double() for i in range(n_layers)]
    head = HeadCollapse(d, cfg).double()
    with torch.no_grad():
        for mod in [*layers, head]:
            (mod.phi if neutral == "phi_zero" else mod.alpha).zero_()
    ffns = [TinyFFN(d, gen) for _ in range(n_layers)]
    x = torch.randn(2, 5, d, generator=gen, dtype=F64)

    streams = expand_streams(x, m)
    for hc, ffn in zip(layers, ffns, strict=True):
        streams = hc(streams, ffn)
    got = rms_norm(head(streams))
    ref = x
    for ffn in ffns:
        ref = ref + ffn(rms_norm(ref))
    ref = rms_norm(ref)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # and the default random phi (alpha = 0.01) stays close to it
    for mod in [*layers, head]:
        mod.reset_parameters()
    streams = expand_streams(x, m)
    for hc, ffn in zip(layers, ffns, strict=True):
        streams = hc(streams, ffn)
    assert (rms_norm(head(streams)) - ref).abs().max() < 1e-2


# ---------------------------------------------------------------- symmetry (why phi must be random)


def run_stack(layers, ffns, head, x: Tensor, m: int) -> tuple[Tensor, Tensor]:
    streams = expand_streams(x, m)
    for hc, ffn in zip(layers, ffns, strict=True):
        streams = hc(streams, ffn)
    return streams, rms_norm(head(streams))


def stream_spread(streams: Tensor) -> float:
    return float((streams - streams[:, :, :1]).detach().abs().max())


def test_phi_zero_streams_never_diverge_even_under_training() -> None:
    gen = torch.Generator().manual_seed(10)
    m, d, n_layers = 4, 6, 2
    cfg = make_cfg(m, alpha_init=1.0)
    layers = [HyperConnection(d, cfg, i).double() for i in range(n_layers)]
    head = HeadCollapse(d, cfg).double()
    with torch.no_grad():
        for mod in [*layers, head]:
            mod.phi.zero_()
    ffns = [TinyFFN(d, gen) for _ in range(n_layers)]
    x = torch.randn(2, 5, d, generator=gen, dtype=F64)
    target = torch.randn(2, 5, d, generator=gen, dtype=F64)
    params = [p for mod in [*layers, head, *ffns] for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(5):
        streams, out = run_stack(layers, ffns, head, x, m)
        assert stream_spread(streams) < 1e-12
        loss = (out - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(float(mod.phi.detach().abs().max()) > 1e-6 for mod in layers)  # phi moved, but symmetrically
    streams, _ = run_stack(layers, ffns, head, x, m)
    assert stream_spread(streams) < 1e-12


def test_random_phi_breaks_stream_symmetry() -> None:
    gen = torch.Generator().manual_seed(11)
    m, d = 4, 6
    hc = HyperConnection(d, make_cfg(m)).double()  # default init: random phi, alpha = 0.01
    ffn = TinyFFN(d, gen)
    x = torch.randn(2, 5, d, generator=gen, dtype=F64)
    weight = torch.randn(2, 5, m, d, generator=gen, dtype=F64)

    streams = expand_streams(x, m).requires_grad_(True)
    out = hc(streams, ffn)
    (out * weight.mean(dim=2, keepdim=True)).sum().backward()  # stream-symmetric loss
    assert stream_spread(out.detach()) > 1e-7
    assert stream_spread(streams.grad) > 1e-7

    with torch.no_grad():
        hc.phi.zero_()
    streams = expand_streams(x, m).requires_grad_(True)
    out = hc(streams, ffn)
    (out * weight.mean(dim=2, keepdim=True)).sum().backward()
    assert stream_spread(out.detach()) < 1e-14
    assert stream_spread(streams.grad) < 1e-14


# ---------------------------------------------------------------- gradients


def test_gradients_reach_all_parameters_and_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(12)
    m, d = 3, 4
    hc = HyperConnection(d, make_cfg(m, sinkhorn_iters=5)).double()
    randomise(hc, gen)
    head = HeadCollapse(d, make_cfg(m)).double()
    randomise(head, gen)
    ffn = TinyFFN(d, gen)
    streams = torch.randn(1, 2, m, d, generator=gen, dtype=F64)
    weight = torch.randn(1, 2, d, generator=gen, dtype=F64)

    def loss_fn(phi, bias, alpha, h_phi, h_bias, h_alpha):
        out = torch.func.functional_call(hc, {"phi": phi, "bias": bias, "alpha": alpha}, (streams, ffn))
        h = torch.func.functional_call(head, {"phi": h_phi, "bias": h_bias, "alpha": h_alpha}, (out,))
        return (h * weight).sum()

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in [*hc.parameters(), *head.parameters()])
    assert torch.autograd.gradcheck(loss_fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)

    loss_fn(*inputs).backward()
    for p in inputs:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


def test_default_init_parameters() -> None:
    cfg = make_cfg(4, phi_init_std=0.02, alpha_init=0.01)
    hc = HyperConnection(32, cfg, layer_index=3)
    assert hc.phi.shape == (24, 128) and hc.bias.shape == (24,) and hc.alpha.shape == (3,)
    assert all(p.dtype == torch.float32 for p in hc.parameters())
    assert torch.equal(hc.bias, torch.zeros(24)) and torch.allclose(hc.alpha, torch.full((3,), 0.01))
    assert abs(float(hc.phi.detach().std()) - 0.02) < 0.003
    head = HeadCollapse(32, cfg)
    assert head.phi.shape == (4, 128) and head.bias.shape == (4,) and head.alpha.shape == (1,)
