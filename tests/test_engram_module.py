"""EngramModule against an independent fp64 reference (forward and backward), plus init, causality,
row-sparse table gradients and the parameter inventory per ablation switch."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engram_pretrain.model.config import EngramConfig
from engram_pretrain.model.engram import (
    EngramModule,
    EngramTable,
    LocalEngramTable,
    local_table_factory,
)

TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# Independent reference (reads only parameter tensors of the module under test)
# ----------------------------------------------------------------------------------------------------

def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def ref_engram(p: dict[str, torch.Tensor], h: torch.Tensor, row_ids: torch.Tensor, cfg: EngramConfig,
               head_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: [B, T, G, D], row_ids: [B, T, H] -> (Y [B, T, G, D], alpha [B, T, G], u [B, T, G, D])."""
    bsz, seq, g, d = h.shape
    offsets = [sum(head_sizes[:k]) for k in range(len(head_sizes))]
    table = p["table.weight"]
    # explicit gather: head k rows start at offsets[k]; order-major concat -> e [B, T, d_mem]
    e = torch.cat([table[row_ids[:, :, k] + offsets[k]] for k in range(len(head_sizes))], dim=-1)
    value = e @ p["value_proj.weight"].T + p["value_proj.bias"]  # [B, T, D]
    eps = cfg.norm_eps
    outs, alphas, us = [], [], []
    for m in range(g):
        if cfg.gating:
            key = e @ p[f"key_projs.{m}.weight"].T + p[f"key_projs.{m}.bias"]
            key = ref_rmsnorm(key, p[f"key_norms.{m}.weight"], eps)
            query = ref_rmsnorm(h[:, :, m, :], p[f"query_norms.{m}.weight"], eps)
            s = (key * query).sum(dim=-1) / math.sqrt(d)
            if cfg.signed_sqrt_gate:
                s = torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
            alpha = 1.0 / (1.0 + torch.exp(-s))
        else:
            alpha = torch.ones(bsz, seq, dtype=h.dtype)
        alphas.append(alpha)
        u = alpha[..., None] * value  # [B, T, D]
        us.append(u)
        if not cfg.short_conv:
            outs.append(u)
            continue
        x = ref_rmsnorm(u, p[f"conv_norms.{m}.weight"], eps)
        w = p["conv.weight"][m * d:(m + 1) * d, 0, :]  # [D, K] for this branch's channels
        ksz, dil = cfg.conv_kernel, cfg.max_ngram
        ys = []
        for t in range(seq):
            acc = torch.zeros(bsz, d, dtype=h.dtype)
            for j in range(ksz):
                src = t - (ksz - 1 - j) * dil
                if src >= 0:
                    acc = acc + w[:, j] * x[:, src, :]
            ys.append(acc)
        y = torch.stack(ys, dim=1)  # [B, T, D]
        outs.append(u + y / (1.0 + torch.exp(-y)))
    return torch.stack(outs, dim=2), torch.stack(alphas, dim=2), torch.stack(us, dim=2)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def primes_from(start: int, count: int) -> list[int]:
    out, n = [], start
    while len(out) < count:
        n += 1
        if n > 1 and all(n % q for q in range(2, int(n ** 0.5) + 1)):
            out.append(n)
    return out


def build(cfg: EngramConfig, hidden: int, branches: int, head_sizes: list[int] | None = None,
          seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[EngramModule, list[int]]:
    torch.manual_seed(seed)
    nheads = (cfg.max_ngram - 1) * cfg.num_heads
    if head_sizes is None:
        head_sizes = primes_from(4, nheads)
    table = LocalEngramTable(sum(head_sizes), cfg.d_mem // nheads, init_std=cfg.table_init_std)
    mod = EngramModule(hidden, cfg, layer_id=1, head_sizes=head_sizes, num_branches=branches, table=table)
    return mod.to(dtype), head_sizes


def randomize(mod: EngramModule, seed: int = 1) -> None:
    """Overwrite every parameter (conv weights, biases, norm gains) so that every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in mod.named_parameters():
            noise = torch.randn(prm.shape, generator=g, dtype=prm.dtype)
            if "norms" in name:
                prm.copy_(1.0 + 0.2 * noise)
            elif name == "conv.weight":
                prm.copy_(0.5 * noise)
            elif name == "table.weight":
                prm.copy_(noise)
            else:
                prm.copy_(0.3 * noise)


def inputs(mod: EngramModule, bsz: int, seq: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(bsz, seq, mod.num_branches, mod.hidden_size, generator=g, dtype=torch.float64)
    rows = torch.stack([torch.randint(0, s, (bsz, seq), generator=g) for s in mod.head_sizes], dim=-1)
    return h, rows


def base_cfg(**kw: object) -> EngramConfig:
    return replace(EngramConfig(layers=[1], max_ngram=3, num_heads=2, d_mem=24, conv_kernel=4,
                                norm_eps=1e-6), **kw)


# ----------------------------------------------------------------------------------------------------
# Forward + backward equivalence
# ----------------------------------------------------------------------------------------------------

CASES = {
    "multi_branch_m4": (base_cfg(), 4, None),
    "single_branch": (base_cfg(multi_branch=False), 1, None),
    "m1_plain_residual": (base_cfg(), 1, None),
    "gating_off": (base_cfg(gating=False), 4, None),
    "conv_off": (base_cfg(short_conv=False), 4, None),
    "gating_and_conv_off": (base_cfg(gating=False, short_conv=False), 2, None),
    "signed_sqrt_off": (base_cfg(signed_sqrt_gate=False), 4, None),
    "ngram4_same_budget": (base_cfg(max_ngram=4), 4, None),  # d_head 6 -> 4
    "kernel3_eps": (base_cfg(conv_kernel=3, norm_eps=1e-3), 2, None),
    "uneven_head_sizes": (base_cfg(), 3, [31, 5, 97, 13]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_match_reference(name: str) -> None:
    cfg, branches, head_sizes = CASES[name]
    hidden = 8
    mod, head_sizes = build(cfg, hidden, branches, head_sizes)
    randomize(mod)
    h, rows = inputs(mod, bsz=2, seq=14)
    h.requires_grad_(True)

    y = mod(h, rows)
    params = dict(mod.named_parameters())
    y_ref, alpha_ref, u_ref = ref_engram(params, h, rows, cfg, head_sizes)
    assert y.shape == (2, 14, branches, hidden)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(mod.last_gate_mean, alpha_ref.mean(dim=(0, 1)), **TOL)
    if cfg.short_conv:  # the conv path must contribute, else the comparison would not test it
        assert (y_ref - u_ref).abs().max() > 1e-2
    if cfg.gating:  # gates must vary, else alpha could be a constant
        assert alpha_ref.std() > 1e-3

    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    names = list(params)
    if cfg.gating:  # without gating Y does not depend on h at all
        names = ["h"] + names
        params["h"] = h
    leaves = [params[n] for n in names]
    grads = torch.autograd.grad((y * probe).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), leaves)
    for n, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g_ref.abs().max() > 0, f"reference gradient of {n} is zero; test would be vacuous"
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m, n=n: f"grad {n}: {m}")


# ----------------------------------------------------------------------------------------------------
# Init, causality, sparsity, inventory, validation
# ----------------------------------------------------------------------------------------------------

def test_conv_zero_init_gives_y_equal_u() -> None:
    cfg = base_cfg()
    mod, _ = build(cfg, hidden=8, branches=4)
    assert torch.count_nonzero(mod.conv.weight) == 0
    h, rows = inputs(mod, bsz=2, seq=12)
    y = mod(h, rows)
    _, _, u_ref = ref_engram(dict(mod.named_parameters()), h, rows, cfg, mod.head_sizes)
    torch.testing.assert_close(y, u_ref, **TOL)
    # same parameters without the conv: bit-identical output
    no_conv, _ = build(replace(cfg, short_conv=False), hidden=8, branches=4)
    missing, unexpected = no_conv.load_state_dict(mod.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"conv.weight"} | {f"conv_norms.{m}.weight" for m in range(4)}
    assert torch.equal(y, no_conv(h, rows))
    # demo init (conv_zero_init=False): the conv contributes at init
    demo, _ = build(replace(cfg, conv_zero_init=False), hidden=8, branches=4)
    demo.load_state_dict({k: v for k, v in mod.state_dict().items() if k != "conv.weight"}, strict=False)
    assert torch.count_nonzero(demo.conv.weight) == demo.conv.weight.numel()
    assert (demo(h, rows) - y).abs().max() > 1e-4


def test_init_statistics() -> None:
    cfg = base_cfg(d_mem=256, num_heads=4, table_init_std=0.05)
    torch.manual_seed(0)
    nheads = 8
    sizes = primes_from(200, nheads)
    table = LocalEngramTable(sum(sizes), cfg.d_mem // nheads, init_std=cfg.table_init_std)
    mod = EngramModule(128, cfg, layer_id=0, head_sizes=sizes, num_branches=2, table=table, init_std=0.03)
    for lin in [mod.value_proj, *mod.key_projs]:
        assert abs(lin.weight.std().item() - 0.03) < 0.002
        assert torch.count_nonzero(lin.bias) == 0
    assert abs(mod.table.weight.std().item() - 0.05) < 0.002
    for norm in [*mod.key_norms, *mod.query_norms, *mod.conv_norms]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert mod.conv.weight.shape == (2 * 128, 1, cfg.conv_kernel)
    assert mod.conv.dilation == (cfg.max_ngram,)
    assert mod.head_offsets.tolist() == [sum(sizes[:k]) for k in range(nheads)]
    assert "head_offsets" not in mod.state_dict()


@pytest.mark.parametrize("max_ngram", [3, 4])
def test_causality_and_dilated_receptive_field(max_ngram: int) -> None:
    cfg = base_cfg(max_ngram=max_ngram)
    mod, _ = build(cfg, hidden=8, branches=2)
    randomize(mod)
    seq, t0 = 16, 3
    h, rows = inputs(mod, bsz=2, seq=seq)
    y = mod(h, rows).detach()

    # future perturbation (h and row ids after t0) leaves Y[:t0 + 1] bit-identical
    h2, rows2 = h.clone(), rows.clone()
    h2[:, t0 + 1:] += 1.0
    rows2[:, t0 + 1:] = (rows2[:, t0 + 1:] + 1) % torch.tensor(mod.head_sizes)
    y2 = mod(h2, rows2).detach()
    assert torch.equal(y2[:, :t0 + 1], y[:, :t0 + 1])
    assert (y2[:, t0 + 1:] - y[:, t0 + 1:]).abs().amax(dim=(0, 2, 3)).min() > 0

    # a change at t0 only reaches t0 + j * dilation for j < kernel
    dil, ksz = cfg.max_ngram, cfg.conv_kernel
    expected = {t0 + j * dil for j in range(ksz) if t0 + j * dil < seq}
    for h3, rows3 in ((h.clone(), rows), (h, rows.clone())):
        if h3 is not h:
            h3[:, t0] += 1.0
        else:
            rows3[:, t0] = (rows3[:, t0] + 1) % torch.tensor(mod.head_sizes)
        diff = (mod(h3, rows3).detach() - y).abs().amax(dim=(0, 2, 3))
        assert {t for t in range(seq) if diff[t] > 0} == expected


@pytest.mark.parametrize("sparse", [False, True])
def test_table_gradient_is_row_sparse(sparse: bool) -> None:
    cfg = base_cfg()
    sizes = primes_from(50, 4)
    torch.manual_seed(0)
    table = LocalEngramTable(sum(sizes), cfg.d_mem // 4, init_std=0.02, sparse=sparse).double()
    mod = EngramModule(8, cfg, layer_id=0, head_sizes=sizes, num_branches=4, table=table).double()
    h, rows = inputs(mod, bsz=2, seq=5)
    (mod(h, rows) ** 2).sum().backward()
    grad = table.weight.grad
    assert grad.is_sparse == sparse
    grad = grad.to_dense()
    offsets = [sum(sizes[:k]) for k in range(4)]
    looked_up = {int(rows[b, t, k]) + offsets[k] for b in range(2) for t in range(5) for k in range(4)}
    touched = set(torch.nonzero(grad.abs().sum(dim=1)).flatten().tolist())
    assert touched == looked_up
    assert len(looked_up) < table.num_rows


@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("short_conv", [True, False])
def test_parameter_inventory(gating: bool, short_conv: bool) -> None:
    g = 3
    mod, _ = build(base_cfg(gating=gating, short_conv=short_conv), hidden=8, branches=g)
    expected = {"table.weight", "value_proj.weight", "value_proj.bias"}
    if gating:
        for m in range(g):
            expected |= {f"key_projs.{m}.weight", f"key_projs.{m}.bias", f"key_norms.{m}.weight",
                         f"query_norms.{m}.weight"}
    if short_conv:
        expected |= {"conv.weight"} | {f"conv_norms.{m}.weight" for m in range(g)}
    assert {n for n, _ in mod.named_parameters()} == expected
    assert mod.value_proj.weight.shape == (8, 24)
    if gating:
        assert all(k.weight.shape == (8, 24) for k in mod.key_projs)
    h, rows = inputs(mod, bsz=1, seq=4)
    mod(h, rows)
    assert mod.last_gate_mean.shape == (g,)
    if not gating:
        assert torch.equal(mod.last_gate_mean, torch.ones(g, dtype=torch.float64))


class ListTable:
    """A table that is not an nn.Module (e.g. an offloaded store): only the protocol."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.num_rows, self.dim = weight.shape

    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[flat_row_ids]


def test_table_protocol_and_factory() -> None:
    cfg = base_cfg()
    sizes = primes_from(10, 4)
    t = local_table_factory(init_std=0.02)(1, sum(sizes), 6)
    assert isinstance(t, LocalEngramTable) and isinstance(t, EngramTable)
    assert (t.num_rows, t.dim) == (sum(sizes), 6)

    torch.manual_seed(0)
    ref = EngramModule(8, cfg, layer_id=1, head_sizes=sizes, num_branches=2, table=t).double()
    other = ListTable(ref.table.weight.detach().clone())
    assert isinstance(other, EngramTable)
    mod = EngramModule(8, cfg, layer_id=1, head_sizes=sizes, num_branches=2, table=other).double()
    mod.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "table.weight"})
    assert "table.weight" not in dict(mod.named_parameters())
    h, rows = inputs(ref, bsz=2, seq=6)
    torch.testing.assert_close(mod(h, rows), ref(h, rows), **TOL)
    torch.testing.assert_close(mod.memory(rows), ref.memory(rows), **TOL)
    assert mod.memory(rows).shape == (2, 6, cfg.d_mem)


def test_validation_errors() -> None:
    cfg = base_cfg()
    sizes = primes_from(10, 4)

    def make(**kw: object) -> EngramModule:
        args: dict[str, object] = dict(hidden_size=8, cfg=cfg, layer_id=0, head_sizes=sizes, num_branches=2,
                                       table=LocalEngramTable(sum(sizes), 6))
        args.update(kw)
        return EngramModule(**args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="table dim"):
        make(table=LocalEngramTable(sum(sizes), 5))
    with pytest.raises(ValueError, match="rows"):
        make(table=LocalEngramTable(sum(sizes) + 1, 6))
    with pytest.raises(ValueError, match="head sizes"):
        make(head_sizes=sizes[:3])
    with pytest.raises(ValueError, match="multi_branch"):
        make(cfg=replace(cfg, multi_branch=False))
    with pytest.raises(ValueError, match="d_mem"):
        make(cfg=replace(cfg, d_mem=25))
    mod = make()
    with pytest.raises(ValueError, match="h must be"):
        mod(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        mod(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 3, dtype=torch.long))



def test_bf16_gates_reduce_in_fp32() -> None:
    """A bf16 module takes the gate's D-long dot product, signed sqrt and sigmoid in fp32: from the bf16 keys
    and queries it computes, alpha is the exact (fp64) gate up to one bf16 rounding of the result (<= 2^-9
    below 1). A bf16 product or sigmoid misses that bound (about 3e-3 at D = 256)."""
    import math

    import torch.nn.functional as F

    from engram_pretrain.model.engram import GATE_ABS_MIN, _branch_rms_norm

    cfg = base_cfg()
    mod, _ = build(cfg, hidden=256, branches=2)
    randomize(mod)
    h, rows = inputs(mod, 4, 50)
    bf = mod.to(torch.bfloat16)
    hb = h.to(torch.bfloat16)
    with torch.no_grad():
        e = bf.memory(rows)
        got = bf.gates(hb, e)
        weight = torch.cat([p.weight for p in bf.key_projs])
        bias = torch.cat([p.bias for p in bf.key_projs])
        key = _branch_rms_norm(F.linear(e, weight, bias).unflatten(-1, (2, 256)), bf.key_norms)
        query = _branch_rms_norm(hb, bf.query_norms)
        score = (key.double() * query.double()).sum(-1) / math.sqrt(256)
        want = torch.sigmoid(torch.sign(score) * torch.sqrt(score.abs().clamp_min(GATE_ABS_MIN)))
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 2 ** -9 + 1e-6
