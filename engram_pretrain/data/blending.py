"""Deterministic weighted interleave of several sample sources (Megatron's blending rule), unbounded.

Global sample n is drawn from the source that is furthest behind its target: the source i maximising
``w_i * (n + 1) - c_i(n)``, where c_i(n) counts the samples source i gave to samples 0..n-1 (ties go to
the lower index). Source i's k-th pick is its sample k, so each source is read in its own (shuffled,
epoch-repeating) order. The realised counts never stray more than about one sample from ``w_i * n``.

The weights are normalised and made rational, ``w_i = m_i / P`` (exactly when they are ratios of small
integers, e.g. [0.3, 0.7] or [1, 2]; otherwise to the nearest 1/65536). After P samples every count is
exactly m_i, so the greedy state repeats and the order is periodic with period P: one period is
computed once (pure integer arithmetic) and any global index maps to (source, sample) in O(1), which
makes resuming at any consumed-sample count free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Protocol

import numpy as np

MAX_PERIOD = 65536
"""Longest blending period; irrational-looking weights are rounded to multiples of 1 / MAX_PERIOD."""


class SampleSource(Protocol):
    """Anything indexable by a non-negative sample index giving int64 [seq_len + 1] tokens."""

    seq_len: int

    def __getitem__(self, i: int) -> np.ndarray: ...


def period_counts(weights: Sequence[float], max_period: int = MAX_PERIOD) -> list[int]:
    """Samples per period of each weight: exact for small ratios, else largest remainders of max_period."""
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"blending weights must be finite, non-negative, with a positive sum; got {weights}")
    fracs = [Fraction(w).limit_denominator(max_period) for w in weights]
    total = sum(fracs)
    if total > 0:
        shares = [f / total for f in fracs]
        period = math.lcm(*(s.denominator for s in shares))
        if period <= max_period:
            return [int(s * period) for s in shares]
    exact = [w / sum(weights) * max_period for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: max_period - sum(counts)]:
        counts[i] += 1
    return counts


def greedy_pattern(counts: Sequence[int]) -> np.ndarray:
    """Source of each of the P = sum(counts) samples of one period (greedy rule, weights counts / P)."""
    period = sum(counts)
    taken = [0] * len(counts)
    pattern = np.empty(period, dtype=np.int16 if len(counts) < 2**15 else np.int64)
    for n in range(period):
        best, best_err = 0, counts[0] * (n + 1) - taken[0] * period  # error scaled by P: exact integers
        for i in range(1, len(counts)):
            err = counts[i] * (n + 1) - taken[i] * period
            if err > best_err:
                best, best_err = i, err
        pattern[n] = best
        taken[best] += 1
    assert taken == list(counts), "the greedy order returns to its start state after one period"
    return pattern


class BlendedSamples:
    """Unbounded weighted interleave of ``sources``; sample n -> ``sources[i][k]`` with (i, k) = locate(n)."""

    def __init__(self, sources: Sequence[SampleSource], weights: Sequence[float] | None = None) -> None:
        if not sources:
            raise ValueError("BlendedSamples needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} blending weights for {len(sources)} sources")
        lengths = {s.seq_len for s in sources}
        if len(lengths) != 1:
            raise ValueError(f"blended sources disagree on seq_len: {sorted(lengths)}")
        self.sources = list(sources)
        self.seq_len = sources[0].seq_len
        self.counts = period_counts(weights)  # samples of each source per period
        self.period = sum(self.counts)
        self.weights = [c / self.period for c in self.counts]  # the realised (normalised, rational) weights
        self._pattern = greedy_pattern(self.counts)  # [P] source of each position
        self._rank = np.zeros(self.period, dtype=np.int64)  # [P] picks of that source before the position
        for i in range(len(self.counts)):
            where = self._pattern == i
            self._rank[where] = np.arange(int(where.sum()))

    def locate(self, n: int) -> tuple[int, int]:
        """(source, index within that source) of global sample ``n``."""
        if n < 0:
            raise IndexError(f"sample index {n} is negative")
        block, r = divmod(int(n), self.period)
        src = int(self._pattern[r])
        return src, block * self.counts[src] + int(self._rank[r])

    def source_counts(self, n: int) -> np.ndarray:
        """Samples each source has given to global samples [0, n): int64 [num_sources]."""
        block, r = divmod(int(n), self.period)
        partial = np.bincount(self._pattern[:r], minlength=len(self.counts))
        return block * np.asarray(self.counts, dtype=np.int64) + partial

    def __getitem__(self, n: int) -> np.ndarray:
        """Global sample ``n``: int64 [seq_len + 1]."""
        src, k = self.locate(n)
        return self.sources[src][k]

    def __repr__(self) -> str:
        return f"BlendedSamples(sources={len(self.sources)}, weights={self.weights}, period={self.period})"
