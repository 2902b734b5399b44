"""Engram multi-head n-gram hashing: multipliers, prime table sizes and row ids.

Bit-compatible with the reference demo (`engram_demo_v1.py`, deepseek-ai/Engram):

- multipliers of layer l: `rng = numpy.random.default_rng(seed + 10007 * l)`,
  `half = max(1, (int64_max // V') // 2)`, `m = 2 * rng.integers(0, half, size=N, dtype=int64) + 1`
  (V' = compressed vocabulary size), so `m[k] * (V' - 1) < 2**63`;
- table sizes: one global set of used primes; for each layer (configured order), each order n and
  each head, the smallest prime above the previous one (starting above `base_size[n] - 1`) that is
  not yet used;
- row ids: `mix_n = XOR_k x[t-k] * m[k]`, `row = mix_n mod p` (see `model/engram_hash.py`).

The numpy path of `NgramHasher.hash` is the straightforward reference; the torch path runs
`engram_pretrain.model.engram_hash.ngram_hash` on the input's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import sympy
import torch

from ..model import engram_hash

if TYPE_CHECKING:
    from ..model.config import EngramConfig
    from .compression import CompressionMap

LAYER_SEED_STRIDE = 10007
"""Per-layer seed offset of the multiplier RNG (the demo's PRIME_1)."""


def normalize_base_sizes(base_sizes: int | Sequence[int], max_ngram: int) -> list[int]:
    """Per-order (2..N) prime-search starts; an int or a 1-element list is broadcast to every order."""
    if max_ngram < 2:
        raise ValueError(f"max_ngram must be >= 2, got {max_ngram}")
    sizes = [int(base_sizes)] if isinstance(base_sizes, int | np.integer) else [int(s) for s in base_sizes]
    if len(sizes) == 1:
        sizes = sizes * (max_ngram - 1)
    if len(sizes) != max_ngram - 1:
        raise ValueError(
            f"base_sizes needs one value per order 2..{max_ngram} ({max_ngram - 1} values) or a single "
            f"value, got {len(sizes)}"
        )
    if min(sizes) < 2:
        raise ValueError(f"base sizes must be >= 2, got {sizes}")
    return sizes


def layer_multipliers(layer_id: int, seed: int, max_ngram: int, compressed_vocab_size: int) -> np.ndarray:
    """The layer's odd hash multipliers: int64 [max_ngram]."""
    if compressed_vocab_size < 1:
        raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
    m_max = int(np.iinfo(np.int64).max // compressed_vocab_size)
    half = max(1, m_max // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
    r = rng.integers(low=0, high=half, size=(max_ngram,), dtype=np.int64)
    return r * 2 + 1


def table_primes(
    layer_ids: Sequence[int], max_ngram: int, heads: int, base_sizes: int | Sequence[int]
) -> dict[int, list[list[int]]]:
    """Prime table sizes: layer -> per order (2..N) -> per head; all distinct across layers/orders/heads."""
    sizes = normalize_base_sizes(base_sizes, max_ngram)
    seen: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for base in sizes:
            start = base - 1
            heads_p = []
            for _ in range(heads):
                candidate = start + 1
                while not sympy.isprime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                heads_p.append(candidate)
                start = candidate
            per_order.append(heads_p)
        primes[int(layer_id)] = per_order
    return primes


def segment_ids_from_eod(raw_ids: np.ndarray | torch.Tensor, eod_id: int) -> np.ndarray | torch.Tensor:
    """Document index per position: segment[t] = number of `eod_id` in raw_ids[..., :t] (same type out).

    The EOD token belongs to the document it ends. Use on raw (uncompressed) ids.
    """
    if isinstance(raw_ids, torch.Tensor):
        return engram_hash.segment_ids_from_eod(raw_ids, eod_id)
    is_eod = (np.asarray(raw_ids) == eod_id).astype(np.int64)
    return np.cumsum(is_eod, axis=-1) - is_eod


class NgramHasher:
    """Multi-head hashing of compressed-id n-grams (orders 2..max_ngram) for a set of Engram layers.

    Args:
        layer_ids: Engram layers, in the order that decides the prime assignment.
        max_ngram: largest order N.
        heads: hash heads K per order.
        base_sizes: per order 2..N, the start of the prime search (int / 1-element list: broadcast).
        compressed_vocab_size: V' (bounds the multipliers so products never overflow int64).
        pad_id: COMPRESSED id read before the sequence start.
        seed: multiplier seed.
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        max_ngram: int,
        heads: int,
        base_sizes: int | Sequence[int],
        compressed_vocab_size: int,
        pad_id: int,
        seed: int = 0,
    ) -> None:
        self.layer_ids = [int(layer) for layer in layer_ids]
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"duplicate layer ids: {self.layer_ids}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if not 0 <= pad_id < compressed_vocab_size:
            raise ValueError(
                f"pad_id {pad_id} outside the compressed vocabulary [0, {compressed_vocab_size})"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.max_ngram = int(max_ngram)
        self.heads = int(heads)
        self.base_sizes = normalize_base_sizes(base_sizes, self.max_ngram)
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.multipliers: dict[int, np.ndarray] = {
            layer: layer_multipliers(layer, self.seed, self.max_ngram, self.compressed_vocab_size)
            for layer in self.layer_ids
        }
        self.primes: dict[int, list[list[int]]] = table_primes(
            self.layer_ids, self.max_ngram, self.heads, self.base_sizes
        )
        self._torch_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: EngramConfig, compression: CompressionMap) -> NgramHasher:
        """Hasher of an `EngramConfig` over `compression` (maps the raw pad id to its compressed id)."""
        return cls(
            layer_ids=cfg.layers,
            max_ngram=cfg.max_ngram,
            heads=cfg.num_heads,
            base_sizes=cfg.base_table_size,
            compressed_vocab_size=compression.compressed_vocab_size,
            pad_id=compression.compress_id(cfg.pad_token_id),
            seed=cfg.seed,
        )

    @property
    def num_columns(self) -> int:
        """Row ids per position: (max_ngram - 1) * heads."""
        return (self.max_ngram - 1) * self.heads

    def head_sizes(self, layer_id: int) -> list[int]:
        """Table size of every (order, head) of the layer, order-major: [(N-1) * K]."""
        return [p for order in self._primes_of(layer_id) for p in order]

    def hash(
        self,
        compressed_ids: np.ndarray | torch.Tensor,
        layer_id: int,
        segment_ids: np.ndarray | torch.Tensor | None = None,
    ) -> np.ndarray | torch.Tensor:
        """compressed_ids [B, T] -> row ids [B, T, (N-1)*K] int64 (same array type and device).

        Ids are range-checked (ValueError), which synchronises a CUDA input; the model's hot path
        calls `engram_hash.ngram_hash` on its buffers directly.
        """
        self._primes_of(layer_id)
        if isinstance(compressed_ids, torch.Tensor):
            return self._hash_torch(compressed_ids, layer_id, segment_ids)
        return self._hash_numpy(np.asarray(compressed_ids), layer_id, segment_ids)

    def hash_all(
        self,
        compressed_ids: np.ndarray | torch.Tensor,
        segment_ids: np.ndarray | torch.Tensor | None = None,
    ) -> dict[int, np.ndarray | torch.Tensor]:
        """Row ids for every layer: layer -> [B, T, (N-1)*K]."""
        return {layer: self.hash(compressed_ids, layer, segment_ids) for layer in self.layer_ids}

    def _primes_of(self, layer_id: int) -> list[list[int]]:
        if layer_id not in self.primes:
            raise ValueError(f"layer {layer_id} has no Engram (layers: {self.layer_ids})")
        return self.primes[layer_id]

    def _check_ids(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.compressed_vocab_size:
            raise ValueError(
                f"compressed ids must lie in [0, {self.compressed_vocab_size}), got range [{lo}, {hi}]"
            )

    def _hash_numpy(self, x: np.ndarray, layer_id: int, segment_ids: np.ndarray | None) -> np.ndarray:
        if x.ndim != 2:
            raise ValueError(f"compressed_ids must be [B, T], got shape {x.shape}")
        x = x.astype(np.int64, copy=False)
        if x.size:
            self._check_ids(int(x.min()), int(x.max()))
        T = x.shape[1]
        seg = None
        if segment_ids is not None:
            seg = np.asarray(segment_ids)
            if seg.shape != x.shape:
                raise ValueError(f"segment_ids shape {seg.shape} != ids shape {x.shape}")

        def shift(k: int) -> np.ndarray:
            out = np.full_like(x, self.pad_id)
            if k < T:
                out[:, k:] = x[:, : T - k]
                if seg is not None:
                    out[:, k:][seg[:, k:] != seg[:, : T - k]] = self.pad_id
            return out

        m = self.multipliers[layer_id]
        shifts = [shift(k) for k in range(self.max_ngram)]
        cols = []
        for n in range(2, self.max_ngram + 1):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for p in self.primes[layer_id][n - 2]:
                cols.append(mix % np.int64(p))
        return np.stack(cols, axis=2)  # [B, T, (N-1)*K]

    def _hash_torch(
        self, x: torch.Tensor, layer_id: int, segment_ids: torch.Tensor | np.ndarray | None
    ) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"compressed_ids must be [B, T], got shape {tuple(x.shape)}")
        if x.numel():
            self._check_ids(int(x.min()), int(x.max()))
        key = (layer_id, str(x.device))
        if key not in self._torch_cache:
            self._torch_cache[key] = (
                torch.as_tensor(self.multipliers[layer_id], dtype=torch.long, device=x.device),
                torch.tensor(self.head_sizes(layer_id), dtype=torch.long, device=x.device),
            )
        mult, sizes = self._torch_cache[key]
        seg = None if segment_ids is None else torch.as_tensor(segment_ids, device=x.device)
        return engram_hash.ngram_hash(x.long(), mult, sizes, self.max_ngram, self.heads, self.pad_id, seg)
