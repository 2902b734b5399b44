"""The data an Engram model needs to turn raw token ids into table row ids, and the module holding it.

`EngramAddressing` is built by `engram_pretrain.memory.addressing_builder.build_addressing` (compression map
plus hash parameters) and handed to the model, which keeps it in buffers (`EngramAddresser`) so a
saved or exported model computes its own row ids on device, bit-identical to the reference hashing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .engram_hash import ngram_hash


@dataclass
class EngramAddressing:
    """Per-layer hash parameters plus the tokenizer compression lookup."""

    layer_multipliers: dict[int, list[int]]
    """Odd int64 multipliers per Engram layer, one per n-gram position (max_ngram values)."""
    layer_head_sizes: dict[int, list[int]]
    """Prime table size of every (order, head) of each layer, order-major."""
    compression_lookup: list[int] | None
    """Raw id -> compressed id; None means identity (the `w/o token compress` ablation)."""
    compressed_vocab_size: int
    """Number of compressed ids V'."""
    pad_id: int
    """Compressed id used for positions before the sequence start."""


class EngramAddresser(nn.Module):
    """Holds the addressing as buffers and hashes raw ids into per-layer row ids on device."""

    def __init__(self, addressing: EngramAddressing, max_ngram: int, num_heads: int) -> None:
        super().__init__()
        self.layers = sorted(addressing.layer_multipliers)
        self.max_ngram = max_ngram
        self.num_heads = num_heads
        self.pad_id = addressing.pad_id
        self.compressed_vocab_size = addressing.compressed_vocab_size
        self.compress_ids = addressing.compression_lookup is not None
        self._head_sizes = {layer: list(addressing.layer_head_sizes[layer]) for layer in self.layers}
        lookup = addressing.compression_lookup if self.compress_ids else []
        self.register_buffer("compression", torch.tensor(lookup, dtype=torch.int64))
        for layer in self.layers:
            self.register_buffer(f"multipliers_{layer}",
                                 torch.tensor(addressing.layer_multipliers[layer], dtype=torch.int64))
            self.register_buffer(f"head_sizes_{layer}",
                                 torch.tensor(addressing.layer_head_sizes[layer], dtype=torch.int64))

    def head_sizes(self, layer: int) -> list[int]:
        """Prime table sizes of one layer (order-major)."""
        return list(self._head_sizes[layer])

    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw ids [B, T] -> compressed ids [B, T] (identity when compression is off)."""
        return self.compression[input_ids] if self.compress_ids else input_ids

    def row_ids(self, input_ids: torch.Tensor,
                segment_ids: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """input_ids: [B, T] raw ids -> {layer: row ids [B, T, (N-1) * K]} (per-head, no offsets).

        A plain method, not `forward`: module hooks (ZeRO-3's among them) cannot walk int-keyed dicts.
        """
        compressed = self.compress(input_ids)
        return {
            layer: ngram_hash(compressed, getattr(self, f"multipliers_{layer}"),
                              getattr(self, f"head_sizes_{layer}"), self.max_ngram, self.num_heads,
                              self.pad_id, segment_ids)
            for layer in self.layers
        }
