"""The whole model: causality, mHC init equivalence, on-device addressing, ablation switches, training."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from engram_pretrain.memory.addressing_builder import build_addressing, build_hasher
from engram_pretrain.memory.compression import CompressionMap
from engram_pretrain.model.config import ModelConfig
from engram_pretrain.model.hyper_connections import HeadCollapse, HyperConnection
from engram_pretrain.model.transformer import EngramMoEModel


def tiny_config(**engram: object) -> ModelConfig:
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, max_seq_len=32)
    cfg.moe.num_routed_experts, cfg.moe.expert_dim, cfg.attention.num_heads = 4, 16, 4
    cfg.engram.layers = [0, 2]
    cfg.engram.num_heads = 2
    cfg.engram.d_mem = 16
    cfg.engram.base_table_size = [31, 37]
    for key, value in engram.items():
        setattr(cfg.engram, key, value)
    cfg.validate()
    return cfg


def build(cfg: ModelConfig, seed: int = 0, compression: CompressionMap | None = None) -> EngramMoEModel:
    torch.manual_seed(seed)
    addressing = build_addressing(cfg, compression) if cfg.engram.layers else None
    return EngramMoEModel(cfg, addressing)


ABLATIONS = {
    "reference": {},
    "w/o multi branch": {"multi_branch": False},
    "w/o token compress": {"token_compression": False},
    "w/o gating": {"gating": False},
    "w/o short conv": {"short_conv": False},
    "+4-gram": {"max_ngram": 4, "d_mem": 24, "base_table_size": [31, 37, 41]},
    "no conv zero-init": {"conv_zero_init": False},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_causal_for_every_variant(name: str) -> None:
    model = build(tiny_config(**ABLATIONS[name])).eval()
    ids = torch.randint(0, 97, (2, 20))
    t = 11
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 20 - t - 1))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_row_ids_match_reference_hasher() -> None:
    cfg = tiny_config()
    lookup = np.random.default_rng(0).integers(0, 60, size=97).astype(np.int64)
    lookup[np.argsort(lookup, kind="stable")] = np.arange(97) % 60  # surjective onto 0..59
    cmap = CompressionMap(lookup=lookup, compressed_vocab_size=60, vocab_size=97,
                          tokenizer_fingerprint="test")
    model = build(cfg, compression=cmap)
    ids = torch.randint(0, 97, (3, 17))
    hasher = build_hasher(cfg, 60, int(lookup[cfg.engram.pad_token_id]))
    got = model.engram_row_ids(ids)
    for layer in cfg.engram.layers:
        want = hasher.hash(lookup[ids.numpy()], layer)
        assert np.array_equal(got[layer].numpy(), want)


def test_doc_boundary_reset_switch() -> None:
    cfg = tiny_config(reset_at_doc_boundary=True)
    model = build(cfg)
    ids = torch.randint(3, 97, (1, 12))
    ids[0, 5] = 1  # EOD
    seg = (ids == 1).long().cumsum(-1) - (ids == 1).long()
    with_reset = model.engram_row_ids(ids, seg)
    second_doc = model.engram_row_ids(ids[:, 6:])
    for layer in cfg.engram.layers:
        assert torch.equal(with_reset[layer][:, 6:], second_doc[layer])


def _zero_dynamic_hc(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, HyperConnection | HeadCollapse) and hasattr(module, "phi"):
            with torch.no_grad():
                module.phi.zero_()


@pytest.mark.parametrize("with_engram", [False, True])
def test_mhc_at_init_equals_plain_residual_network(with_engram: bool) -> None:
    cfg4 = tiny_config(norm_eps=1e-12) if with_engram else tiny_config(layers=[])
    cfg4.norm_eps = 1e-12  # the norms' eps would otherwise see the x2 scale of the stream sum
    cfg1 = copy.deepcopy(cfg4)
    cfg1.hyper_connections.num_streams = 1
    m4, m1 = build(cfg4).double().eval(), build(cfg1).double().eval()
    _zero_dynamic_hc(m4)
    state1 = m1.state_dict()
    for name, tensor in m4.state_dict().items():  # copy every shared weight; replicate per-branch ones
        src = name.replace("key_projs.1.", "key_projs.0.").replace("key_projs.2.", "key_projs.0.")
        src = src.replace("key_projs.3.", "key_projs.0.")
        for k in ("key_norms", "query_norms", "conv_norms"):
            for m in (1, 2, 3):
                src = src.replace(f"{k}.{m}.", f"{k}.0.")
        if src in state1 and state1[src].shape == tensor.shape:
            tensor.copy_(state1[src])
        elif name.endswith("conv.weight"):
            tensor.copy_(state1[src].repeat(4, 1, 1))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        a, b = m4(ids).logits, m1(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_loss_decreases_on_repeated_batch() -> None:
    cfg = tiny_config()
    cfg.moe.seq_aux_loss_coef = 1e-3
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(40):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        assert out.aux_loss is not None and out.loss is not None
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_moe_biases()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    bias = torch.stack([m.router.expert_bias for m in model.moe_layers()])
    assert bias.abs().max() > 0  # the loss-free bias moved


def test_hidden_states_and_engram_tables_get_gradients() -> None:
    model = build(tiny_config())
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids[:, :-1], labels=ids[:, 1:], output_hidden_states=True)
    assert len(out.hidden_states) == 1 + model.config.num_layers
    out.loss.backward()
    for block in model.blocks:
        if block.engram is not None:
            grad = block.engram.table.weight.grad
            assert grad is not None and 0 < int((grad.abs().sum(-1) > 0).sum()) <= 2 * 8 * 4


def test_engram_layers_need_addressing() -> None:
    with pytest.raises(ValueError, match="EngramAddressing"):
        EngramMoEModel(tiny_config())


def _compile_config(extra: list[str] | None = None) -> Any:
    from engram_pretrain.config import load_config

    return load_config(None, [*(extra or []), "model.vocab_size=96", "model.hidden_size=32",
                              "model.num_layers=3", "model.attention.num_heads=2",
                              "model.moe.num_routed_experts=4",
                              "model.moe.expert_dim=16", "model.engram.layers=[1]", "model.engram.d_mem=16",
                              "model.engram.num_heads=2", "model.engram.base_table_size=[101]",
                              "model.engram.token_compression=false", "train.compile=true"])


def test_train_compile_compiles_every_block() -> None:
    from engram_pretrain.train.engine import build_model

    model, _ = build_model(_compile_config(), None)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model.embed._compiled_call_impl is None and model.lm_head._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_blocks_match_eager_outputs_and_gradients() -> None:
    """train.compile (CPU inductor): loss equal within 1e-6 and every gradient within 1e-6 of eager."""
    from engram_pretrain.train.engine import build_model

    cfg = _compile_config()
    grads, losses = [], []
    for compiled in (False, True):
        cfg.train.compile = compiled
        model, store = build_model(cfg, None)
        ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=ids.roll(-1, 1))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        grads[-1].update({f"table{k}": p.grad.to_dense() for k, p in store.tables.items()})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6, msg=name)


MLA_Q_LORA = ["model.attention.kind=mla", "model.attention.head_dim=8", "model.attention.rope_head_dim=4",
              "model.attention.kv_lora_rank=16", "model.attention.q_lora_rank=16",
              "model.attention.v_head_dim=8"]


@pytest.mark.parametrize("mode, every, aux, variant", [
    ("full", 1, 0.0, []), ("full", 2, 0.01, []),
    ("selective", 1, 0.0, []), ("selective", 2, 0.01, []),
    ("selective", 1, 0.01, [*MLA_Q_LORA, "model.engram.multi_branch=true"]),
    ("selective", 1, 0.0, ["model.hyper_connections.num_streams=1", "model.moe.first_k_dense=0"]),
], ids=["full-1", "full-2-aux", "selective-1", "selective-2-aux", "selective-mla-multibranch",
        "selective-1stream"])
def test_activation_recompute_gives_the_same_gradients_and_counts_loads_once(
        mode: str, every: int, aux: float, variant: list[str]) -> None:
    """train.activation_checkpointing=full|selective (blocks 0, every, ...): fp64 loss and every gradient
    equal to the run without recompute, MoE loads counted once, gate and mHC statistics those of the
    forward, and fewer saved bytes."""
    from engram_pretrain.model.hyper_connections import HyperConnection
    from engram_pretrain.model.recompute import saved_tensor_meter
    from engram_pretrain.train.engine import build_model

    cfg = _compile_config(variant)
    cfg.train.compile = False
    cfg.model.moe.seq_aux_loss_coef = aux
    results = []
    for m in ("none", mode):
        cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every = m, every
        model, store = build_model(cfg, None)
        model = model.double().train()
        for table in store.views.values():
            table.weight.data = table.weight.data.double()
        hcs = [h for h in model.modules() if isinstance(h, HyperConnection)]
        for h in hcs:
            h.track_stats = True
        ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
        with saved_tensor_meter() as meter:
            out = model(ids, labels=ids.roll(-1, 1))
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        grads.update({f"table{k}": p.grad.to_dense() for k, p in store.tables.items()})
        loads = [m.load_accum.clone() for m in model.moe_layers()]
        gates = [b.engram.last_gate_mean for b in model.blocks if b.engram is not None]
        stats = [dict(h.last_stats) for h in hcs]
        results.append((loss.detach(), grads, loads, gates, model.recompute_every, stats, meter.nbytes))
    (l0, g0, ld0, gt0, r0, st0, b0), (l1, g1, ld1, gt1, r1, st1, b1) = results
    assert r0 == 0 and r1 == every
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=0, atol=1e-12, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(ld0, ld1, strict=True)) and sum(x.sum() for x in ld0) > 0
    assert all(torch.equal(a, b) for a, b in zip(gt0, gt1, strict=True))
    for a, b in zip(st0, st1, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b1 < b0, (b1, b0)
