"""Shard writing with checkpoints: train/valid builders, rollover by token count, ``progress.json``.

Shards of both splits are closed together at a piece boundary once either holds ``shard_tokens``
tokens; each close is a checkpoint: both shards are finalized (``.bin`` then ``.idx`` renamed into
place), then ``progress.json`` records the next piece, the finished shards and the counts so far. A
rerun resumes after the last checkpoint; shard files that ``progress.json`` does not list (``.tmp``
files, or shards finalized after the checkpoint) are deleted first, so nothing left by a killed run
looks complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from engram_pretrain.data.indexed import IndexedDatasetBuilder

SPLITS = ("train", "valid")
PROGRESS_NAME = "progress.json"
_SHARD_FILE = re.compile(r"^(train|valid)_\d{5}\.(bin|idx)(\.tmp)?$")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temp file, fsync, then os.replace (readers never see a partial file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean_stale_shards(out: Path, keep: set[str]) -> list[str]:
    """Delete shard files (and temp files) whose prefix is not in `keep`; returns the deleted names."""
    removed = []
    for p in sorted(out.iterdir()):
        name = p.name
        stale_tmp = name.startswith(".") and ".tmp-" in name and not p.is_dir()
        if (_SHARD_FILE.match(name) and (name.endswith(".tmp") or name.rsplit(".", 1)[0] not in keep)) \
                or stale_tmp:
            p.unlink()
            removed.append(name)
    return removed


class ShardWriter:
    """Open train/valid builders; `checkpoint_due` after a piece says whether to close them."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, resume: dict | None = None) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out = out
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        resume = resume or {}
        zero = {"num_documents": 0, "num_tokens": 0}
        self.shards = {s: list(resume.get("shards", {}).get(s, [])) for s in SPLITS}
        self.counts = {s: dict(resume.get("counts", {}).get(s, zero)) for s in SPLITS}
        self._builders: dict[str, IndexedDatasetBuilder | None] = dict.fromkeys(SPLITS)

    def write(self, split: str, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents (`tokens` flat, `sizes` per document) to the open shard of `split`."""
        if not len(sizes):
            return
        b = self._builders[split]
        if b is None:
            name = f"{split}_{len(self.shards[split]):05d}"
            b = self._builders[split] = IndexedDatasetBuilder(self.out / name, self.dtype)
        b.add_documents(tokens, sizes)
        self.counts[split]["num_documents"] += len(sizes)
        self.counts[split]["num_tokens"] += int(tokens.size)

    def checkpoint_due(self) -> bool:
        return any(b is not None and b.num_tokens >= self.shard_tokens for b in self._builders.values())

    def close_shards(self) -> None:
        """Finalize every open shard (train first) and register it."""
        for split in SPLITS:
            b = self._builders[split]
            if b is not None:
                b.finalize()
                self.shards[split].append(b.prefix.name)
                self._builders[split] = None

    def abort(self) -> None:
        """Delete the open shards' temp files."""
        for split in SPLITS:
            b = self._builders[split]
            if b is not None:
                b.abort()
                self._builders[split] = None

    def state(self) -> dict:
        return {"shards": {s: list(v) for s, v in self.shards.items()},
                "counts": {s: dict(v) for s, v in self.counts.items()}}
