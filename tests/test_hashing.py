"""NgramHasher / ngram_hash against an independent pure-python implementation of the reference demo."""

from __future__ import annotations

import numpy as np
import pytest
import sympy
import torch

from engram_pretrain.memory.reference_hash import NgramHasher, segment_ids_from_eod
from engram_pretrain.model import engram_hash

INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------- independent reference (python ints)
def ref_multipliers(layer_id: int, seed: int, max_ngram: int, vocab: int) -> list[int]:
    half = max(1, (INT64_MAX // vocab) // 2)
    rng = np.random.default_rng(seed + 10007 * layer_id)
    draws = rng.integers(0, half, size=max_ngram, dtype=np.int64)
    return [2 * int(r) + 1 for r in draws]


def ref_primes(
    layer_ids: list[int], max_ngram: int, heads: int, base: list[int]
) -> dict[int, list[list[int]]]:
    used: set[int] = set()
    out = {}
    for layer in layer_ids:
        orders = []
        for n in range(2, max_ngram + 1):
            prev = base[n - 2] - 1
            found = []
            for _ in range(heads):
                c = prev + 1
                while c in used or not sympy.isprime(c):
                    c += 1
                used.add(c)
                found.append(c)
                prev = c
            orders.append(found)
        out[layer] = orders
    return out


def ref_rows(x, mult, primes, pad, seg=None) -> list:
    """x: nested lists [B][T] -> [B][T][(N-1)*K] with python ints and explicit loops."""
    N = len(mult)
    out = []
    for b, row in enumerate(x):
        out_b = []
        for t in range(len(row)):
            cols = []
            for n in range(2, N + 1):
                mix = 0
                for k in range(n):
                    if t - k < 0 or (seg is not None and seg[b][t - k] != seg[b][t]):
                        tok = pad
                    else:
                        tok = row[t - k]
                    mix ^= tok * mult[k]
                cols.extend(mix % p for p in primes[n - 2])
            out_b.append(cols)
        out.append(out_b)
    return out


CONFIGS = [
    # layers, N, heads, base sizes per order, V', pad, seed
    ([1, 15], 3, 8, [1009, 1013], 1000, 2, 0),
    ([0, 2, 5], 4, 1, [31, 37, 41], 50, 0, 7),
    ([1, 15], 4, 8, [129280 * 5] * 3, 99092, 2, 0),
    ([0, 2, 5], 3, 1, [129280 * 5, 129280 * 5], 129280, 7, 7),
    ([3], 3, 8, [5, 5], 17, 16, 7),  # tiny: both orders start at the same base, primes must differ
]


@pytest.mark.parametrize("layers,N,K,base,V,pad,seed", CONFIGS)
def test_matches_reference(layers, N, K, base, V, pad, seed):
    h = NgramHasher(layers, N, K, base, V, pad, seed)
    primes = ref_primes(layers, N, K, base)
    rng = np.random.default_rng(123)
    x = rng.integers(0, V, size=(2, 9)).tolist()
    x[0][3] = V - 1
    for layer in layers:
        mult = ref_multipliers(layer, seed, N, V)
        assert [int(m) for m in h.multipliers[layer]] == mult
        assert h.multipliers[layer].dtype == np.int64
        assert h.primes[layer] == primes[layer]
        assert h.head_sizes(layer) == [p for order in primes[layer] for p in order]
        expected = ref_rows(x, mult, primes[layer], pad)
        got_np = h.hash(np.array(x), layer)
        assert got_np.dtype == np.int64 and got_np.shape == (2, 9, (N - 1) * K)
        assert got_np.tolist() == expected
        got_t = h.hash(torch.tensor(x), layer)
        assert got_t.dtype == torch.int64
        assert got_t.tolist() == expected


def test_primes_distinct_and_no_overflow():
    layers, N, K = [0, 2, 5], 4, 8
    h = NgramHasher(layers, N, K, [101, 101, 103], 129280, 2, 7)
    flat = [p for layer in layers for p in h.head_sizes(layer)]
    assert len(flat) == len(layers) * (N - 1) * K
    assert len(set(flat)) == len(flat)
    assert all(sympy.isprime(p) and p >= 101 for p in flat)
    for V in (2, 17, 129280, 10**9):
        hv = NgramHasher(layers, N, K, 11, V, 0, 0)
        for layer in layers:
            m = [int(v) for v in hv.multipliers[layer]]
            assert all(v % 2 == 1 for v in m)
            assert max(m) * (V - 1) < 2**63


def test_base_size_broadcast_and_errors():
    a = NgramHasher([1], 3, 2, 1009, 100, 0)
    b = NgramHasher([1], 3, 2, [1009], 100, 0)
    c = NgramHasher([1], 3, 2, [1009, 1009], 100, 0)
    assert a.primes == b.primes == c.primes
    with pytest.raises(ValueError):
        NgramHasher([1], 4, 2, [1009, 1009], 100, 0)
    with pytest.raises(ValueError):
        NgramHasher([1], 3, 2, 1009, 100, pad_id=100)
    with pytest.raises(ValueError):
        a.hash(np.array([[0, 100]]), 1)
    with pytest.raises(ValueError):
        a.hash(np.array([[0, 1]]), 2)


def test_numpy_torch_bit_equal_large_vocab():
    V = 129280
    h = NgramHasher([1, 15], 4, 8, [129280 * 5] * 3, V, 2, 0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, size=(4, 257))
    x[:, :8] = V - 1
    x[1, 100:110] = 0
    for layer, got_np in h.hash_all(x).items():
        got_t = h.hash(torch.from_numpy(x), layer)
        np.testing.assert_array_equal(got_t.numpy(), got_np)
        sizes = np.array(h.head_sizes(layer))
        assert (got_np >= 0).all() and (got_np < sizes).all()


def test_short_sequences():
    h = NgramHasher([0], 4, 2, 13, 10, 3, 1)
    mult, primes = ref_multipliers(0, 1, 4, 10), h.primes[0]
    for T in (0, 1, 2):
        x = [[5] * T, [9] * T]
        exp = np.array(ref_rows(x, mult, primes, 3), dtype=np.int64).reshape(2, T, 6)
        np.testing.assert_array_equal(h.hash(np.array(x, dtype=np.int64).reshape(2, T), 0), exp)
        np.testing.assert_array_equal(h.hash(torch.tensor(x, dtype=torch.long).reshape(2, T), 0).numpy(), exp)


# ---------------------------------------------------------------- document-boundary reset
def test_segment_reset():
    V, pad = 500, 4
    h = NgramHasher([2], 4, 3, [211, 223, 227], V, pad, 5)
    rng = np.random.default_rng(1)
    doc1, doc2 = rng.integers(0, V, size=(2, 7)), rng.integers(0, V, size=(2, 11))
    x = np.concatenate([doc1, doc2], axis=1)
    seg = np.concatenate([np.zeros((2, 7), np.int64), np.ones((2, 11), np.int64)], axis=1)
    for conv in (np.asarray, torch.from_numpy):
        plain = np.asarray(h.hash(conv(x), 2))
        np.testing.assert_array_equal(np.asarray(h.hash(conv(x), 2, conv(np.zeros_like(seg)))), plain)
        reset = np.asarray(h.hash(conv(x), 2, conv(seg)))
        np.testing.assert_array_equal(reset[:, 7:], np.asarray(h.hash(conv(doc2), 2)))
        np.testing.assert_array_equal(reset[:, :7], plain[:, :7])
        assert (reset[:, 7:9] != plain[:, 7:9]).any()
        expected = ref_rows(x.tolist(), ref_multipliers(2, 5, 4, V), h.primes[2], pad, seg.tolist())
        assert reset.tolist() == expected


def test_causal():
    V = 300
    h = NgramHasher([0], 3, 4, 97, V, 1, 0)
    rng = np.random.default_rng(2)
    x = rng.integers(0, V, size=(3, 20))
    seg = segment_ids_from_eod(x, int(x[0, 5]))
    for t in (0, 5, 12, 19):
        y = x.copy()
        y[:, t + 1 :] = rng.integers(0, V, size=(3, 19 - t))
        for s in (None, seg):
            np.testing.assert_array_equal(h.hash(y, 0, s)[:, : t + 1], h.hash(x, 0, s)[:, : t + 1])
        yt = h.hash(torch.from_numpy(y), 0)[:, : t + 1]
        np.testing.assert_array_equal(yt.numpy(), h.hash(x, 0)[:, : t + 1])


def test_segment_ids_from_eod():
    eod = 1
    x = np.array([[5, 1, 3, 1, 1, 7], [1, 2, 2, 2, 2, 1]])
    expected = []
    for row in x.tolist():
        expected.append([sum(1 for v in row[:t] if v == eod) for t in range(len(row))])
    assert segment_ids_from_eod(x, eod).tolist() == expected
    got_t = segment_ids_from_eod(torch.from_numpy(x), eod)
    assert isinstance(got_t, torch.Tensor) and got_t.tolist() == expected
    assert engram_hash.segment_ids_from_eod(torch.from_numpy(x), eod).tolist() == expected


def test_ngram_hash_validates_shapes():
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError):
        engram_hash.ngram_hash(x, torch.ones(2, dtype=torch.long), torch.ones(4, dtype=torch.long), 3, 2, 0)
    with pytest.raises(ValueError):
        engram_hash.ngram_hash(x, torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long), 3, 2, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_numpy():
    V = 129280
    h = NgramHasher([1, 15], 3, 8, [129280 * 5] * 2, V, 2, 0)
    rng = np.random.default_rng(3)
    x = rng.integers(0, V, size=(4, 513))
    x[:, -5:] = V - 1
    seg = segment_ids_from_eod(x, int(x[0, 100]))
    xc, sc = torch.from_numpy(x).cuda(), torch.from_numpy(seg).cuda()
    for layer in h.layer_ids:
        got = h.hash(xc, layer)
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), h.hash(x, layer))
        np.testing.assert_array_equal(h.hash(xc, layer, sc).cpu().numpy(), h.hash(x, layer, seg))
