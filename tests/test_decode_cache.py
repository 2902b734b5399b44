"""Incremental decoding with `DecodeCache` equals one full forward (fp32 and fp64), hashing with the kept
token history is bit-identical, and left padding (attention_mask) leaves the real tokens' logits as
they are without padding."""

from __future__ import annotations

import pytest
import torch

from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.model.config import ModelConfig
from engram_pretrain.model.transformer import EngramMoEModel

VARIANTS = {
    # attention kind, Engram switches
    "gqa": ("gqa", {}),
    "mla": ("mla", {}),
    "gqa 4-gram single-branch": ("gqa", {"max_ngram": 4, "d_mem": 24, "base_table_size": [31, 37, 41],
                                         "multi_branch": False}),
    "mla doc-reset": ("mla", {"reset_at_doc_boundary": True}),
}


def make_model(kind: str, engram: dict, dtype: torch.dtype, seed: int = 0) -> EngramMoEModel:
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=4, max_seq_len=64)
    cfg.attention.kind = kind
    cfg.attention.num_heads = 4
    if kind == "gqa":
        cfg.attention.num_kv_heads = 2
    else:
        cfg.attention.head_dim, cfg.attention.rope_head_dim = 8, 8
        cfg.attention.kv_lora_rank, cfg.attention.q_lora_rank = 16, 12
    cfg.moe.num_routed_experts, cfg.moe.top_k, cfg.moe.expert_dim, cfg.moe.first_k_dense = 6, 2, 16, 1
    cfg.hyper_connections.num_streams = 4
    e = cfg.engram
    e.layers, e.num_heads, e.d_mem, e.base_table_size = [0, 1, 3], 2, 16, [31, 37]
    e.conv_zero_init = False  # a zero conv would hide a wrong history
    for key, value in engram.items():
        setattr(e, key, value)
    torch.manual_seed(seed)
    model = EngramMoEModel(cfg, build_addressing(cfg, None)).to(dtype).eval()
    for name, p in model.named_parameters():  # random HC gates/biases so mHC is far from its init
        if name.endswith(("alpha", ".bias")) and p.dtype.is_floating_point:
            torch.nn.init.normal_(p, std=0.5)
    return model


def run_chunks(model: EngramMoEModel, ids: torch.Tensor, sizes: list[int],
               segments: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] of `ids` fed chunk by chunk through one cache."""
    cache, pos, outs = model.new_cache(), 0, []
    for n in sizes:
        seg = None if segments is None else segments[:, pos:pos + n]
        outs.append(model(ids[:, pos:pos + n], segment_ids=seg, cache=cache).logits)
        pos += n
        assert cache.seq_len == pos
    assert pos == ids.shape[1]
    return torch.cat(outs, dim=1)


SCHEDULES = {"prefill 5 then steps": [5] + [1] * 17, "ragged chunks": [1, 2, 1, 7, 3, 1, 7]}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_equals_full_forward(variant: str, dtype: torch.dtype, tol: float) -> None:
    kind, engram = VARIANTS[variant]
    model = make_model(kind, engram, dtype)
    ids = torch.randint(0, 97, (2, 22))
    segments = None
    if engram.get("reset_at_doc_boundary"):
        segments = torch.zeros_like(ids)
        segments[0, 9:], segments[1, 4:] = 1, 1
        segments[1, 15:] = 2
    with torch.no_grad():
        full = model(ids, segment_ids=segments).logits
        for sizes in SCHEDULES.values():
            got = run_chunks(model, ids, sizes, segments)
            torch.testing.assert_close(got, full, rtol=0, atol=tol)
    assert full.abs().max() > 10 * tol  # non-trivial logits


def test_hashing_with_history_is_bit_identical() -> None:
    model = make_model("gqa", {"max_ngram": 4, "d_mem": 24, "base_table_size": [31, 37, 41]}, torch.float32)
    ids = torch.randint(0, 97, (3, 19))
    full = model.engram_row_ids(ids)
    cache, pos = model.new_cache(), 0
    for n in [1, 1, 2, 5, 1, 9]:
        chunk = ids[:, pos:pos + n]
        with_hist, _, h = cache.with_history(chunk, None)
        assert h == min(pos, 3)
        for layer, rows in model.engram_row_ids(with_hist).items():
            assert torch.equal(rows[:, h:], full[layer][:, pos:pos + n])
        cache.advance(chunk, None, None)
        pos += n


def test_conv_history_is_what_the_full_conv_reads() -> None:
    model = make_model("gqa", {}, torch.float64)
    ids = torch.randint(0, 97, (2, 10))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        model(ids[:, 4:], cache=cache)
    width = (model.config.engram.conv_kernel - 1) * model.config.engram.max_ngram
    for state in cache.short_conv.values():
        assert state.history is not None and state.history.shape == (2, width, 4 * 32)
    assert cache.token_history is not None and torch.equal(cache.token_history, ids[:, -2:])
    assert all(kv.k is not None and kv.k.shape[2] == 10 for kv in cache.attention)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_left_padding_matches_unpadded_rows(kind: str) -> None:
    model = make_model(kind, {}, torch.float64)
    lengths, pad = [12, 7, 3], 9
    prompts = [torch.randint(0, 97, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    steps = torch.randint(0, 97, (len(lengths), 4))
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)
        chunked = [model(ids[:, 5:], attention_mask=mask[:, 5:], cache=cache).logits]
        chunked += [model(steps[:, k:k + 1], cache=cache).logits for k in range(steps.shape[1])]
        for i, p in enumerate(prompts):
            alone = model(torch.cat((p, steps[i]))[None]).logits[0]
            torch.testing.assert_close(padded[i, width - len(p):], alone[:len(p)], rtol=0, atol=1e-10)
            torch.testing.assert_close(chunked[0][i, -1], alone[len(p) - 1], rtol=0, atol=1e-10)
            for k in range(steps.shape[1]):
                torch.testing.assert_close(chunked[1 + k][i, 0], alone[len(p) + k], rtol=0, atol=1e-10)


def test_cache_reorder_and_errors() -> None:
    model = make_model("gqa", {}, torch.float64)
    ids = torch.randint(0, 97, (3, 8))
    nxt = torch.randint(0, 97, (3, 1))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache=cache)
        cache.reorder(torch.tensor([2, 0]))
        got = model(nxt[[2, 0]], cache=cache).logits[:, -1]
        want = model(torch.cat((ids, nxt), 1)[[2, 0]]).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        with pytest.raises(ValueError, match="batch size"):
            model(nxt, cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.randint(0, 97, (2, 60)), cache=cache)
