"""On-device Engram n-gram hashing (torch only, CPU and CUDA).

Bit-identical to the reference demo's numpy hashing (`engram_pretrain.memory.reference_hash` holds the numpy
reference and the multiplier / prime-size construction). For orders n = 2..N over compressed ids x:

    mix_n[t] = XOR_{k=0..n-1} (x[t-k] * m[k])        (positions t-k < 0 read `pad_id`)
    row[t, (n-2)*K + j] = mix_n[t] mod p[n][j]        (head j of order n, floor modulo)

All arithmetic is int64; the multipliers are chosen so that every product stays below 2**63.
"""

from __future__ import annotations

import torch


def _shift_right(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x: [B, T] -> [B, T] with out[:, t] = x[:, t-k] for t >= k and `fill` before."""
    if k == 0:
        return x
    T = x.shape[1]
    k = min(k, T)
    head = torch.full((x.shape[0], k), fill, dtype=x.dtype, device=x.device)
    return torch.cat([head, x[:, : T - k]], dim=1)


def ngram_hash(
    compressed_ids: torch.Tensor,
    multipliers: torch.Tensor,
    head_sizes: torch.Tensor,
    max_ngram: int,
    num_heads: int,
    pad_id: int,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hash the suffix n-grams (n = 2..max_ngram) ending at every position into per-head row ids.

    Args:
        compressed_ids: [B, T] int64 compressed token ids.
        multipliers: [max_ngram] int64 odd multipliers of this layer.
        head_sizes: [(max_ngram-1) * num_heads] int64 prime table sizes, order-major.
        max_ngram: largest order N (>= 2).
        num_heads: heads K per order.
        pad_id: compressed id read at positions before the sequence start (and, with
            `segment_ids`, at positions belonging to another document).
        segment_ids: optional [B, T] integer document ids; an n-gram position t-k whose segment
            differs from position t's segment reads `pad_id` (document-boundary reset).

    Returns:
        [B, T, (max_ngram-1) * num_heads] int64 row ids, each within its head's table (no offsets).
    """
    if compressed_ids.dim() != 2:
        raise ValueError(f"compressed_ids must be [B, T], got shape {tuple(compressed_ids.shape)}")
    if max_ngram < 2 or num_heads < 1:
        raise ValueError(f"need max_ngram >= 2 and num_heads >= 1, got {max_ngram}, {num_heads}")
    if multipliers.shape != (max_ngram,):
        raise ValueError(f"multipliers must have shape ({max_ngram},), got {tuple(multipliers.shape)}")
    if head_sizes.shape != ((max_ngram - 1) * num_heads,):
        raise ValueError(
            f"head_sizes must have shape ({(max_ngram - 1) * num_heads},), got {tuple(head_sizes.shape)}"
        )
    if segment_ids is not None and segment_ids.shape != compressed_ids.shape:
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids.shape)} != ids shape {tuple(compressed_ids.shape)}"
        )

    x = compressed_ids.long()
    device = x.device
    multipliers = multipliers.to(device=device, dtype=torch.long)
    head_sizes = head_sizes.to(device=device, dtype=torch.long).view(max_ngram - 1, num_heads)

    mix = x * multipliers[0]  # [B, T]
    rows = []
    for k in range(1, max_ngram):
        shifted = _shift_right(x, k, pad_id)
        if segment_ids is not None:
            # Positions t-k < 0 are already pad; their shifted segment value is irrelevant.
            crossed = _shift_right(segment_ids, k, 0) != segment_ids
            shifted = shifted.masked_fill(crossed, pad_id)
        mix = torch.bitwise_xor(mix, shifted * multipliers[k])  # mix of order n = k + 1
        rows.append(torch.remainder(mix.unsqueeze(-1), head_sizes[k - 1]))  # [B, T, K]
    return torch.cat(rows, dim=-1)  # [B, T, (N-1)*K]


def segment_ids_from_eod(raw_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Document index of every position of packed sequences: raw_ids [..., T] -> [..., T] int64.

    segment[t] = number of `eod_id` tokens in raw_ids[..., :t]; an EOD token belongs to the document
    it ends.
    """
    is_eod = (raw_ids == eod_id).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod
