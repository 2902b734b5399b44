"""Tiny dataset directories for tests (the layout `data_prep build` writes, see docs/data.md).

    path = make_dataset_dir(tmp_path / "ds", vocab_size=96, num_docs=(200, 20))

The tokenizer is a word-level `tokenizers.Tokenizer` over the words `w0 .. w{V-2}` plus `<eod>` (id 0),
so the compression map is real (built from the tokenizer) and the fingerprints verify. Documents come from
a seeded first-order Markov chain with a few likely successors per word, so a model can learn them: its
loss falls well below the unigram entropy within a few dozen steps.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..data.dataset_dir import (
    COMPRESSION_MAP_NAME,
    DATASET_FORMAT,
    METADATA_NAME,
    compression_map_fingerprint,
)
from ..data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from ..memory.compression import build_compression_map, tokenizer_fingerprint

EOD_TOKEN = "<eod>"


def _word_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOD_TOKEN: 0, **{f"w{i}": i + 1 for i in range(vocab_size - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def markov_chain(vocab_size: int, seed: int, successors: int = 3) -> np.ndarray:
    """Transition table [V, successors]: the possible next ids (in [1, V)) of every id."""
    return np.random.default_rng(seed).integers(1, vocab_size, size=(vocab_size, successors))


def markov_documents(chain: np.ndarray, num_docs: int, seed: int, mean_len: int = 40) -> list[list[int]]:
    """Documents walking `chain` from a random start (uniform successor choice), each ending with EOD (0)."""
    rng = np.random.default_rng(seed)
    vocab_size, successors = chain.shape
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(mean_len // 2, mean_len * 3 // 2))
        tok = int(rng.integers(1, vocab_size))
        doc = [tok]
        for _ in range(n - 1):
            tok = int(chain[tok, rng.integers(successors)])
            doc.append(tok)
        docs.append(doc + [0])
    return docs


def make_dataset_dir(path: str | Path, vocab_size: int = 96, num_docs: tuple[int, int] = (200, 20),
                     seed: int = 0, mean_len: int = 40) -> Path:
    """Write a complete dataset directory (tokenizer, compression map, train/valid shards, metadata)."""
    path = Path(path)
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer" / "tokenizer.json"))
    (path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "model_max_length": 1 << 30}))
    (path / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOD_TOKEN}))
    cmap = build_compression_map(tok)
    cmap.save(path / COMPRESSION_MAP_NAME)
    dtype = best_fitting_dtype(vocab_size)
    splits = {}
    chain = markov_chain(vocab_size, seed)
    for split, n, doc_seed in (("train", num_docs[0], seed + 1), ("valid", num_docs[1], seed + 2)):
        docs = markov_documents(chain, n, doc_seed, mean_len)
        builder = IndexedDatasetBuilder(path / f"{split}_00000", dtype)
        for d in docs:
            builder.add_document(d)
        builder.finalize()
        splits[split] = {"shards": [f"{split}_00000"], "num_documents": len(docs),
                         "num_tokens": int(sum(len(d) for d in docs))}
    meta = {"format": DATASET_FORMAT, "vocab_size": vocab_size, "eod_token_id": 0, "pad_token_id": None,
            "dtype": np.dtype(dtype).name, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "compression_map_fingerprint": compression_map_fingerprint(cmap), "splits": splits,
            "sources": {"markov": {"documents": sum(v["num_documents"] for v in splits.values()),
                                   "tokens": sum(v["num_tokens"] for v in splits.values()), "skipped": {}}},
            "skipped": {}, "versions": {}, "created": datetime.now(UTC).isoformat(),
            "build": {"run_fingerprint": "test"}}
    (path / METADATA_NAME).write_text(json.dumps(meta, indent=1))
    return path
