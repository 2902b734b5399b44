"""Muon (Moonlight semantics) with AdamW for the rest: NS5, per-expert matrices, scale, torch.optim.Muon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engram_pretrain.config import OptimizerConfig
from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.memory.sparse_optim import RowSparseAdam
from engram_pretrain.model.config import ModelConfig
from engram_pretrain.model.engram import local_table_factory
from engram_pretrain.model.transformer import EngramMoEModel
from engram_pretrain.train.muon import Muon, newton_schulz5
from engram_pretrain.train.param_groups import engram_table_params, param_groups_for

A, B, C = 3.4445, -4.7750, 2.0315


def ns_reference(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """NS5 of one matrix in fp64, as X <- (aI + bP + cP^2) X on the wide orientation."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    eye = np.eye(x.shape[0])
    for _ in range(steps):
        p = x @ x.T
        x = (A * eye + B * p + C * p @ p) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (12, 12)])
def test_ns5_matches_reference(shape: tuple[int, int]) -> None:
    g = randn(*shape, seed=1, dtype=torch.float64)
    ref = ns_reference(g.numpy())
    np.testing.assert_allclose(newton_schulz5(g).numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(newton_schulz5(g.float()).double().numpy(), ref, atol=2e-5)


def test_ns5_is_per_matrix_on_batches() -> None:
    g = randn(3, 6, 10, seed=2, dtype=torch.float64) * torch.tensor([1.0, 100.0, 0.01]).view(3, 1, 1).double()
    out = newton_schulz5(g)
    for e in range(3):
        np.testing.assert_allclose(out[e].numpy(), ns_reference(g[e].numpy()), rtol=1e-10, atol=1e-12)


def test_ns5_singular_values_and_vectors() -> None:
    g = randn(32, 64, seed=3, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o = newton_schulz5(g)
    s_out = torch.linalg.svdvals(o)
    assert s_out.min() > 0.5 and s_out.max() < 1.5
    core = u.T @ o @ vh.T  # diagonal when o = U S' V^T
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-8


def _one_step(p0: torch.Tensor, grads: list[torch.Tensor], **kw: object) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = Muon([p], **kw)  # type: ignore[arg-type]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_update_rms_is_about_0_2_lr_and_decay_uses_unscaled_lr() -> None:
    lr = 1e-2
    p0 = randn(64, 32, seed=4)
    p1 = _one_step(p0, [randn(64, 32, seed=5)], lr=lr, weight_decay=0.0)
    rms = (p1 - p0).pow(2).mean().sqrt().item()
    assert 0.14 * lr < rms < 0.26 * lr
    # a zero gradient leaves only the decoupled decay: W * (1 - lr * wd)
    p2 = _one_step(p0, [torch.zeros(64, 32)], lr=lr, weight_decay=0.1)
    torch.testing.assert_close(p2, p0 * (1 - lr * 0.1), rtol=0, atol=0)


def test_expert_stack_equals_separate_matrices() -> None:
    """[E, A, B]: momentum, NS and the 0.2 * sqrt(max(A, B)) scale per expert, as if each were its own."""
    p0, grads = randn(3, 16, 24, seed=6), [randn(3, 16, 24, seed=7 + i) for i in range(3)]
    grads[1][2] *= 1000.0  # one expert with a much larger gradient must not affect the others
    stacked = _one_step(p0, grads, lr=1e-2, weight_decay=0.1)
    for e in range(3):
        alone = _one_step(p0[e], [g[e] for g in grads], lr=1e-2, weight_decay=0.1)
        torch.testing.assert_close(stacked[e], alone, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_agrees_with_torch_muon_match_rms_adamw(shape: tuple[int, int]) -> None:
    lr, wd = 2e-2, 0.1
    p0 = randn(*shape, seed=8)
    grads = [randn(*shape, seed=9 + i) for i in range(2)]
    ours = _one_step(p0, grads, lr=lr, weight_decay=wd)
    p = torch.nn.Parameter(p0.clone())
    ref = torch.optim.Muon([p], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    for g in grads:
        p.grad = g.clone()
        ref.step()
    theirs = p.detach()
    rel = ((ours - p0) - (theirs - p0)).norm() / (theirs - p0).norm()
    assert rel < 0.03  # torch runs NS in bf16; ours in fp32
    p = torch.nn.Parameter(p0.clone())
    original = torch.optim.Muon([p], lr=lr, weight_decay=wd, adjust_lr_fn="original")
    for g in grads:
        p.grad = g.clone()
        original.step()
    assert ((ours - p.detach()).norm() / (p.detach() - p0).norm()) > 0.06  # the default scale differs


def test_adamw_groups_match_torch_adamw() -> None:
    w0, b0 = randn(6, 5, seed=20), randn(5, seed=21)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    wr, br = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ours = Muon([{"params": [w], "use_muon": False, "weight_decay": 0.1},
                 {"params": [b], "use_muon": False, "weight_decay": 0.0}],
                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([{"params": [wr], "weight_decay": 0.1}, {"params": [br], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for i in range(3):
        for params, opt in (((w, b), ours), ((wr, br), ref)):
            params[0].grad, params[1].grad = randn(6, 5, seed=30 + i), randn(5, seed=40 + i)
            opt.step()
    torch.testing.assert_close(w, wr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, br, rtol=1e-6, atol=1e-7)


def test_nonfinite_gradient_skips_the_step() -> None:
    p = torch.nn.Parameter(randn(4, 4, seed=50))
    before = p.detach().clone()
    opt = Muon([p])
    g = randn(4, 4, seed=51)
    g[0, 0] = float("nan")
    p.grad = g
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), before) and not opt.state[p]


def test_flat_partitions_are_rejected() -> None:
    with pytest.raises(ValueError, match="ZeRO stage 0"):
        Muon([torch.nn.Parameter(torch.zeros(10))])


def test_trains_the_tiny_model_with_row_sparse_tables() -> None:
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, max_seq_len=32)
    cfg.moe.num_routed_experts, cfg.moe.expert_dim, cfg.attention.num_heads = 4, 16, 4
    cfg.engram.layers, cfg.engram.num_heads, cfg.engram.d_mem = [0, 2], 2, 16
    cfg.engram.base_table_size = [31, 37]
    cfg.validate()
    torch.manual_seed(0)
    model = EngramMoEModel(cfg, build_addressing(cfg, None), table_factory=local_table_factory(sparse=True))
    o = OptimizerConfig(name="muon", lr=1e-2)
    opt = Muon(param_groups_for(model, o), lr=o.lr)
    tables = RowSparseAdam(engram_table_params(model), betas=(0.9, 0.95))
    ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        tables.zero_grad()
        loss.backward()
        opt.step()
        tables.step(o.lr * o.engram_lr_multiplier)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5
    assert tables.touched_rows_last_step > 0
