"""Assemble the model's `EngramAddressing` from a compression map and the reference hash parameters."""

from __future__ import annotations

from ..model.addressing import EngramAddressing
from ..model.config import ModelConfig
from .compression import CompressionMap
from .reference_hash import NgramHasher


def build_hasher(cfg: ModelConfig, compressed_vocab_size: int, compressed_pad_id: int) -> NgramHasher:
    """The reference hasher for the Engram layers of `cfg`."""
    e = cfg.engram
    return NgramHasher(layer_ids=list(e.layers), max_ngram=e.max_ngram, heads=e.num_heads,
                       base_sizes=cfg.engram_base_sizes(), compressed_vocab_size=compressed_vocab_size,
                       pad_id=compressed_pad_id, seed=e.seed)


def build_addressing(cfg: ModelConfig, compression: CompressionMap | None) -> EngramAddressing:
    """Addressing for `cfg`'s Engram layers.

    `compression` is the tokenizer's compression map; None (or `engram.token_compression: false`)
    hashes raw ids (identity map over `vocab_size`), which is the `w/o token compress` ablation and
    what parameter counting on the meta device uses.
    """
    e = cfg.engram
    if compression is not None and compression.vocab_size > cfg.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"{compression.vocab_size} ids the compression map covers")
    if e.token_compression and compression is not None:
        lookup = [int(v) for v in compression.lookup]
        vocab = compression.compressed_vocab_size  # V' fixes the multipliers: never change it
        pad = lookup[e.pad_token_id]
        lookup += [pad] * (cfg.vocab_size - len(lookup))  # embedding padding rows never occur in data
    else:
        lookup, vocab, pad = None, cfg.vocab_size, e.pad_token_id
    hasher = build_hasher(cfg, vocab, pad)
    return EngramAddressing(
        layer_multipliers={layer: [int(m) for m in hasher.multipliers[layer]] for layer in e.layers},
        layer_head_sizes={layer: hasher.head_sizes(layer) for layer in e.layers},
        compression_lookup=lookup, compressed_vocab_size=vocab, pad_id=pad)
