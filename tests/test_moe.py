"""DeepSeekMoE layer: router, dropless dispatch, loss-free bias and the sequence balance loss.

References are straightforward per-token fp64 loops written here (DeepSeek-V3 §2.1.2; docs/model.md rules
R1-R6).
"""

from __future__ import annotations

import pytest
import torch

from engram_pretrain.model.config import MoEConfig
from engram_pretrain.model.moe import (
    GroupedExperts,
    LocalExpertDispatcher,
    MoE,
    Router,
    SwiGLU,
    max_violation,
)

D, E, K, H = 8, 6, 2, 4


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops: intra-op threads only add barrier stalls on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(**kw) -> MoEConfig:
    base = dict(num_routed_experts=E, top_k=K, expert_dim=H, num_shared_experts=1, routed_scaling_factor=2.5)
    base.update(kw)
    return MoEConfig(**base)


# ----------------------------------------------------------------------------- fp64 references


def ref_silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def ref_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x: [D]; w1, w3: [D, H]; w2: [H, D] (math orientation: x @ w)."""
    return (ref_silu(x @ w1) * (x @ w3)) @ w2


def ref_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig):
    """One token x: [D] -> (selected expert list, their weights [K], scores [E]), all fp64."""
    logits = torch.stack([(weight[i] * x).sum() for i in range(weight.shape[0])])
    if cfg.score_func == "sigmoid":
        s = 1.0 / (1.0 + torch.exp(-logits))
    else:
        ex = torch.exp(logits - logits.max())
        s = ex / ex.sum()
    biased = [s[i].item() + bias[i].item() for i in range(len(s))]
    sel = sorted(range(len(s)), key=lambda i: -biased[i])[: cfg.top_k]
    g = torch.stack([s[i] for i in sel])
    if cfg.norm_topk_prob:
        g = g / g.sum()
    return sel, g * cfg.routed_scaling_factor, s


def ref_moe(moe: MoE, x: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, list[list[int]]]:
    """x: [B, T, D] -> per-token loop output [B, T, D] and the selected experts of every token."""
    r, ex, sh = moe.router, moe.experts, moe.shared_experts
    flat = x.reshape(-1, x.shape[-1])
    outs, sels = [], []
    for n in range(flat.shape[0]):
        xn = flat[n]
        sel, g, _ = ref_route(xn, r.weight, r.expert_bias, cfg)
        y = torch.zeros_like(xn)
        if sh is not None:
            y = y + ref_swiglu(xn, sh.w1.weight.T, sh.w3.weight.T, sh.w2.weight.T)
        for j, e in enumerate(sel):
            y = y + g[j] * ref_swiglu(xn, ex.w1[e], ex.w3[e], ex.w2[e])
        outs.append(y)
        sels.append(sel)
    return torch.stack(outs).view_as(x), sels


def ref_seq_aux(moe: MoE, x: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """DeepSeek-V3 Eq. 17-20 per sequence (bias-selected experts for f_i; rule R5), averaged over B."""
    total = torch.zeros((), dtype=torch.float64)
    b, t, _ = x.shape
    n_e, k = cfg.num_routed_experts, cfg.top_k
    for bi in range(b):
        counts = [0] * n_e
        p = torch.zeros(n_e, dtype=torch.float64)
        for ti in range(t):
            sel, _, s = ref_route(x[bi, ti], moe.router.weight, moe.router.expert_bias, cfg)
            for e in sel:
                counts[e] += 1
            p = p + s / s.sum()
        p = p / t
        f = [n_e / (k * t) * c for c in counts]
        total = total + sum(f[i] * p[i] for i in range(n_e))
    return cfg.seq_aux_loss_coef * total / b


def double_moe(cfg: MoEConfig, seed: int = 0, bias_scale: float = 0.1) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(D, cfg, init_std=0.5).double()
    with torch.no_grad():
        moe.router.expert_bias.copy_(bias_scale * torch.randn(cfg.num_routed_experts))
    return moe


# ----------------------------------------------------------------------------- router


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_reference(score_func: str, norm: bool) -> None:
    cfg = make_cfg(score_func=score_func, norm_topk_prob=norm, routed_scaling_factor=1.7)
    torch.manual_seed(1)
    router = Router(D, cfg, init_std=0.5)
    with torch.no_grad():
        router.expert_bias.copy_(0.2 * torch.randn(E))
    x = torch.randn(40, D)
    idx, w, scores = router(x)
    assert idx.dtype == torch.int64 and idx.shape == (40, K)
    assert w.dtype == torch.float32 and scores.dtype == torch.float32 and scores.shape == (40, E)
    w64, b64 = router.weight.detach().double(), router.expert_bias.double()
    for n in range(40):
        sel, g, s = ref_route(x[n].double(), w64, b64, cfg)
        got = dict(zip(idx[n].tolist(), w[n].tolist(), strict=True))
        assert sorted(got) == sorted(sel)
        for j, e in enumerate(sel):
            assert got[e] == pytest.approx(g[j].item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(scores[n].double(), s, rtol=1e-5, atol=1e-6)


def test_router_bias_is_selection_only() -> None:
    cfg = make_cfg()
    torch.manual_seed(2)
    router = Router(D, cfg, init_std=0.5)
    x = torch.randn(30, D)
    _, _, scores0 = router(x)
    forced = 3
    with torch.no_grad():
        router.expert_bias[forced] = 10.0
    idx, w, scores = router(x)
    torch.testing.assert_close(scores, scores0)
    assert (idx == forced).any(dim=-1).all()
    for n in range(30):
        sel = idx[n].tolist()
        s = scores0[n].double()
        denom = sum(s[e].item() for e in sel)
        expected = s[forced].item() / denom * cfg.routed_scaling_factor
        assert w[n, sel.index(forced)].item() == pytest.approx(expected, rel=1e-5)
        # with the bias inside the weight the forced expert would dominate (> 99% of the mass)
        assert w[n, sel.index(forced)].item() < 0.99 * cfg.routed_scaling_factor


def test_router_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="top_k"):
        Router(D, make_cfg(top_k=E + 1), 0.02)
    with pytest.raises(ValueError, match="score_func"):
        Router(D, make_cfg(score_func="relu"), 0.02)


# ----------------------------------------------------------------------------- experts


def test_swiglu_and_grouped_experts_match_formula() -> None:
    torch.manual_seed(3)
    mlp = SwiGLU(D, 5, init_std=0.5).double()
    ge = GroupedExperts(D, H, 3, init_std=0.5).double()
    assert ge.w1.shape == (3, D, H) and ge.w3.shape == (3, D, H) and ge.w2.shape == (3, H, D)
    assert ge.num_experts == 3 and ge.expert_offset == 0
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    x = torch.randn(7, D, dtype=torch.float64)
    y = mlp(x)
    for n in range(7):
        ref = ref_swiglu(x[n], mlp.w1.weight.T, mlp.w3.weight.T, mlp.w2.weight.T)
        torch.testing.assert_close(y[n], ref, rtol=1e-12, atol=1e-12)
    for e in range(3):
        ye = ge.forward_expert(e, x)
        for n in range(7):
            ref = ref_swiglu(x[n], ge.w1[e], ge.w3[e], ge.w2[e])
            torch.testing.assert_close(ye[n], ref, rtol=1e-12, atol=1e-12)


def test_local_dispatcher_rejects_sharded_experts() -> None:
    ge = GroupedExperts(D, H, 2, 0.02)
    ge.expert_offset = 2
    with pytest.raises(ValueError, match="expert_offset"):
        LocalExpertDispatcher()(torch.randn(3, D), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), ge)


# ----------------------------------------------------------------------------- MoE forward / backward


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(score_func="softmax", norm_topk_prob=False),
        dict(num_shared_experts=0),
        dict(num_shared_experts=2, top_k=3),
    ],
)
def test_moe_forward_and_grads_match_reference(kw: dict) -> None:
    cfg = make_cfg(**kw)
    moe = double_moe(cfg)
    assert (moe.shared_experts is None) == (cfg.num_shared_experts == 0)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    ref, _ = ref_moe(moe, x, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    probe = torch.randn_like(out)
    params = [x] + [p for p in moe.parameters()]
    g_out = torch.autograd.grad((out * probe).sum(), params)
    g_ref = torch.autograd.grad((ref * probe).sum(), params)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    assert "router.weight" in names
    for name, a, b in zip(names, g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert g_out[names.index("router.weight")].abs().sum() > 0


def test_dropless_with_empty_and_overloaded_experts() -> None:
    cfg = make_cfg()
    moe = double_moe(cfg, bias_scale=0.0)
    with torch.no_grad():
        moe.router.expert_bias[0] = -10.0  # never selected
        moe.router.expert_bias[1] = 10.0  # selected by every token
    x = torch.randn(3, 7, D, dtype=torch.float64)
    out = moe(x)
    ref, sels = ref_moe(moe, x, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    n = 3 * 7
    assert moe.last_load[0] == 0 and moe.last_load[1] == n
    assert moe.last_load.sum() == K * n
    expected = torch.zeros(E)
    for sel in sels:
        for e in sel:
            expected[e] += 1
    torch.testing.assert_close(moe.last_load, expected)


def test_output_independent_of_batch_composition() -> None:
    cfg = make_cfg()
    moe = double_moe(cfg)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    full = moe(x)
    for b in range(2):
        for t in range(6):
            alone = moe(x[b:b + 1, t:t + 1])
            torch.testing.assert_close(alone[0, 0], full[b, t], rtol=1e-12, atol=1e-12)
    sub = moe(x[1:, 2:5])
    torch.testing.assert_close(sub[0], full[1, 2:5], rtol=1e-12, atol=1e-12)


def test_moe_rejects_non_3d_input() -> None:
    moe = MoE(D, make_cfg(), 0.02)
    with pytest.raises(ValueError, match="B, T, D"):
        moe(torch.randn(4, D))


def test_bf16_cast_keeps_bookkeeping_fp32() -> None:
    torch.manual_seed(4)
    moe = MoE(D, make_cfg(), 0.02).bfloat16().train()
    x = torch.randn(2, 3, D, dtype=torch.bfloat16)
    out = moe(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert moe.router.expert_bias.dtype == torch.float32
    assert moe.load_accum.dtype == torch.float32 and moe.load_accum.sum() == K * 6
    moe.update_bias()
    assert moe.router.expert_bias.dtype == torch.float32


# ----------------------------------------------------------------------------- load bookkeeping and bias


def test_load_accum_counts_training_forwards_only() -> None:
    cfg = make_cfg()
    moe = double_moe(cfg).train()
    x1 = torch.randn(2, 4, D, dtype=torch.float64)
    x2 = torch.randn(1, 5, D, dtype=torch.float64)
    moe(x1)
    moe(x2)
    expected = torch.zeros(E, dtype=torch.float64)
    for x in (x1, x2):
        for sel in ref_moe(moe, x, cfg)[1]:
            for e in sel:
                expected[e] += 1
    torch.testing.assert_close(moe.load_accum, expected)
    assert moe.load_accum.sum() == K * (8 + 5)
    assert moe.load_accum.requires_grad is False
    moe.eval()
    moe(x1)
    torch.testing.assert_close(moe.load_accum, expected)
    assert moe.last_load.sum() == K * 8


def test_update_bias_sign_step() -> None:
    gamma = 0.01
    moe = MoE(D, make_cfg(bias_update_rate=gamma), 0.02)
    bias0 = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.05])
    with torch.no_grad():
        moe.router.expert_bias.copy_(bias0)
    load = torch.tensor([9.0, 1.0, 5.0, 5.0, 2.0, 8.0])  # mean 5
    moe.load_accum.copy_(load)
    moe.update_bias()
    step = torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0]) * torch.tensor(gamma, dtype=torch.float32)
    torch.testing.assert_close(moe.router.expert_bias, bias0 + step, rtol=0, atol=1e-7)
    assert moe.load_accum.abs().sum() == 0

    # an explicit (all-reduced) global load takes precedence over the local accumulator
    moe.load_accum.copy_(load)
    before = moe.router.expert_bias.clone()
    moe.update_bias(global_load=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 7.0]))
    step = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0]) * gamma
    torch.testing.assert_close(moe.router.expert_bias, before + step, rtol=0, atol=1e-7)
    assert moe.load_accum.abs().sum() == 0
    with pytest.raises(ValueError, match="global_load"):
        moe.update_bias(global_load=torch.ones(E + 1))


def test_update_bias_frozen_when_gamma_zero() -> None:
    moe = MoE(D, make_cfg(bias_update_rate=0.0), 0.02).train()
    moe(torch.randn(2, 5, D))
    assert moe.load_accum.sum() == K * 10
    moe.update_bias()
    assert torch.equal(moe.router.expert_bias, torch.zeros(E))
    assert moe.load_accum.sum() == 0


def test_bias_is_buffer_in_state_dict_not_parameter() -> None:
    moe = MoE(D, make_cfg(), 0.02)
    sd = moe.state_dict()
    assert "router.expert_bias" in sd and sd["router.expert_bias"].dtype == torch.float32
    assert "load_accum" not in sd
    names = {n for n, _ in moe.named_parameters()}
    assert not any("expert_bias" in n for n in names)
    assert all(p is not moe.router.expert_bias for p in moe.parameters())
    other = MoE(D, make_cfg(), 0.02)
    with torch.no_grad():
        moe.router.expert_bias.fill_(0.25)
    other.load_state_dict(moe.state_dict())
    assert torch.equal(other.router.expert_bias, torch.full((E,), 0.25))


def test_max_violation() -> None:
    assert max_violation(torch.tensor([1.0, 3.0, 2.0, 2.0])).item() == pytest.approx(0.5)
    assert max_violation(torch.zeros(4)).item() == 0.0


# ----------------------------------------------------------------------------- balancing dynamics


def ref_maxvio(load: torch.Tensor) -> float:
    c = load.double().tolist()
    mean = sum(c) / len(c)
    return (max(c) - mean) / mean


def test_loss_free_balancing_toy_run() -> None:
    """A fixed, strongly skewed router is balanced by the bias updates alone."""
    n_e, k, dim = 8, 2, 16
    cfg = MoEConfig(
        num_routed_experts=n_e, top_k=k, num_shared_experts=0, expert_dim=2, bias_update_rate=0.01
    )
    torch.manual_seed(5)
    moe = MoE(dim, cfg, 0.02).train()
    u = torch.randn(dim)
    u = u / u.norm()
    with torch.no_grad():
        moe.router.weight.copy_(0.3 * torch.randn(n_e, dim) + torch.linspace(-1.0, 1.0, n_e)[:, None] * u)
    w0 = moe.router.weight.detach().clone()

    def batch(n: int) -> torch.Tensor:
        return (torch.randn(n, dim) + 2.0 * u).view(1, n, dim)

    with torch.no_grad():
        moe(batch(4096))
        assert ref_maxvio(moe.last_load) > 1.0  # strongly imbalanced at start
        moe.load_accum.zero_()
        for _ in range(300):
            moe(batch(512))
            moe.update_bias()
        moe(batch(4096))
    assert ref_maxvio(moe.last_load) < 0.2
    assert torch.equal(moe.router.weight, w0)


@pytest.mark.parametrize("n_e,k", [(4, 2), (8, 2)])
def test_tied_experts_bias_oscillates(n_e: int, k: int) -> None:
    """Identical scores and a constant input: every step sends all tokens to the same K experts. The
    bias rotates the load round-robin; its spread stays within 2 gamma. With E = 2K the bias itself stays
    bounded; otherwise it drifts in common mode only ((E - 2K) gamma per step in total), which does not
    change the selection."""
    gamma = 1e-3
    cfg = MoEConfig(
        num_routed_experts=n_e, top_k=k, num_shared_experts=0, expert_dim=2, bias_update_rate=gamma
    )
    moe = MoE(D, cfg, 0.02).train()
    with torch.no_grad():
        moe.router.weight.zero_()  # all scores 0.5
    x = torch.randn(1, 1, D).expand(1, 16, D)
    total = torch.zeros(n_e)
    steps = 20 * n_e
    with torch.no_grad():
        for _ in range(steps):
            moe(x)
            total += moe.last_load
            moe.update_bias()
            b = moe.router.expert_bias
            assert (b.max() - b.min()).item() <= 2 * gamma * (1 + 1e-4)
            if n_e == 2 * k:
                assert b.abs().max().item() <= gamma * (1 + 1e-4)
    # round-robin: over the run every expert took the same share
    torch.testing.assert_close(total, torch.full((n_e,), 16.0 * k * steps / n_e))


# ----------------------------------------------------------------------------- sequence-wise aux loss


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_seq_aux_loss_matches_reference(score_func: str) -> None:
    cfg = make_cfg(seq_aux_loss_coef=1e-2, score_func=score_func)
    moe = double_moe(cfg).train()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.dim() == 0
    ref = ref_seq_aux(moe, x, cfg)
    torch.testing.assert_close(moe.aux_loss, ref, rtol=1e-10, atol=1e-14)
    g = torch.autograd.grad(moe.aux_loss, moe.router.weight)[0]
    g_ref = torch.autograd.grad(ref, moe.router.weight)[0]
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-14)


def test_seq_aux_loss_is_alpha_for_uniform_scores() -> None:
    """All scores equal: P_i = 1/E and sum_i f_i = E, so L = alpha whatever the selection."""
    cfg = make_cfg(seq_aux_loss_coef=0.3)
    moe = double_moe(cfg).train()
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(2, 7, D, dtype=torch.float64))
    assert moe.aux_loss.item() == pytest.approx(0.3, rel=1e-12)


def test_seq_aux_loss_absent_when_disabled_or_eval() -> None:
    x = torch.randn(2, 3, D)
    moe = MoE(D, make_cfg(seq_aux_loss_coef=0.0), 0.02).train()
    moe(x)
    assert moe.aux_loss is None
    moe = MoE(D, make_cfg(seq_aux_loss_coef=1e-3), 0.02)
    moe.train()
    moe(x)
    assert moe.aux_loss is not None
    moe.eval()
    moe(x)
    assert moe.aux_loss is None
