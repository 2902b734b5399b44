"""Packed training samples of seq_len + 1 tokens over the documents of one split (Megatron-style indices).

Every document ends with the EOD token, so one epoch is the plain concatenation of all documents of
the split's shards in a seeded shuffled order. Sample ``k`` of the unshuffled epoch is the token window
``stream[k * T : k * T + T + 1]``: consecutive windows overlap by one token (the label shift) and may
span documents. ``samples_per_epoch = (num_tokens - 1) // T``; the tail of fewer than T tokens that does
not fill a window is dropped (a different tail each epoch, since the document order changes).

Three index arrays per epoch, as in Megatron-Core's GPTDataset:

- ``doc_idx[j]``: the global document id at position j of the epoch's document order,
- ``sample_idx[k] = (j, offset)``: window k starts at token ``offset`` of document ``doc_idx[j]``
  (``k`` in ``[0, samples_per_epoch]``),
- ``shuffle_idx[i]``: the window returned as sample i of the epoch (a second seeded permutation).

Sample ``i`` of the whole (unbounded) sequence is sample ``i % samples_per_epoch`` of epoch
``i // samples_per_epoch``. Both permutations of epoch e come from ``np.random.default_rng([seed, e])``.
With ``seed=None`` nothing is shuffled and every epoch is identical (validation).

The indices of an epoch are built on first use with numpy (vectorised: a permutation, a cumsum and a
searchsorted; ~1 s for millions of documents), saved as ``.npy`` under ``cache_dir`` with a name keyed by a
hash of the inputs (shard names, document sizes, seq_len, seed, format version) and memory-mapped. The
first process to take the cache's file lock builds; the others wait and load. Files are written to a
unique temporary name and renamed into place, so a filesystem without working locks only costs duplicate
work, never a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .indexed import IndexedDataset

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
"""Bump when the index construction changes: old cache files are then ignored (their key changes)."""

_INDEX_NAMES = ("doc", "sample", "shuffle")
_OPEN_EPOCHS = 4  # epochs whose memory-mapped indices are kept open


def _index_dtype(upper: int) -> type:
    """int32 when every value fits, else int64."""
    return np.int32 if upper < 2**31 else np.int64


def build_epoch_indices(sizes: np.ndarray, seq_len: int, seed: int | None, epoch: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx [D], sample_idx [S + 1, 2], shuffle_idx [S]) of one epoch; S = (sum(sizes) - 1) // seq_len.

    ``sizes``: tokens per global document id. Vectorised: no Python loop over documents or samples.
    """
    num_docs = len(sizes)
    num_tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (num_tokens - 1) // seq_len
    assert num_samples > 0, "caller checks that the split holds at least seq_len + 1 tokens"
    if seed is None:
        rng = None
        doc_idx = np.arange(num_docs, dtype=_index_dtype(num_docs))
    else:
        rng = np.random.default_rng([seed, epoch])
        doc_idx = rng.permutation(num_docs).astype(_index_dtype(num_docs))
    ordered = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(ordered)  # stream position just after each document of the order
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len  # window starts, all <= num_tokens - 1
    pos = np.searchsorted(ends, starts, side="right")  # first document whose end lies past the start
    offset = starts - (ends - ordered)[pos]
    sample_idx = np.empty((num_samples + 1, 2), dtype=_index_dtype(max(num_docs, int(sizes.max()))))
    sample_idx[:, 0] = pos
    sample_idx[:, 1] = offset
    if rng is None:
        shuffle_idx = np.arange(num_samples, dtype=_index_dtype(num_samples))
    else:
        shuffle_idx = rng.permutation(num_samples).astype(_index_dtype(num_samples))
    return doc_idx, sample_idx, shuffle_idx


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (proceeds unlocked where the filesystem has no locks)."""
    with open(path, "a+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as err:
            logger.warning("no file lock on %s (%s); concurrent ranks may build the same index", path, err)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.lockf(f, fcntl.LOCK_UN)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a unique temporary file in the same directory, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PackedSamples:
    """Samples of ``seq_len + 1`` int64 tokens packed from the documents of ``datasets`` (one split).

    ``len()`` is the number of samples per epoch; indices past it address later epochs (new shuffle).
    """

    def __init__(self, datasets: Sequence[IndexedDataset], seq_len: int, seed: int | None,
                 cache_dir: str | Path | None = None) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.datasets = list(datasets)
        self.seq_len = seq_len
        self.seed = seed
        counts = np.array([len(ds) for ds in self.datasets], dtype=np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(counts)])  # first global doc id per dataset
        self.num_documents = int(self._doc_starts[-1])
        self.sizes: np.ndarray = (np.concatenate([ds.sizes for ds in self.datasets])
                                  if self.datasets else np.zeros(0, np.int32))  # tokens per global doc
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        if self.num_tokens < seq_len + 1:
            names = ", ".join(str(ds.prefix) for ds in self.datasets) or "no shards"
            raise ValueError(f"{names}: {self.num_tokens} tokens cannot fill one sample of seq_len + 1 = "
                             f"{seq_len + 1} tokens; use more data or a smaller data.seq_len")
        self.samples_per_epoch = (self.num_tokens - 1) // seq_len
        self.key = self._cache_key()
        self.cache_dir = self._usable_cache_dir(cache_dir)
        self.num_index_builds = 0  # epochs whose indices this instance computed (vs loaded from cache)
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._indices(0)  # build or load epoch 0 now: the start-up cost lands at construction

    # ------------------------------------------------------------------ indices

    def _cache_key(self) -> str:
        """Hash of everything the indices depend on. Shards enter by file name and document sizes, not by
        absolute path, so a dataset directory keeps its cache when it is moved or mounted elsewhere."""
        h = hashlib.sha256()
        meta = {"version": INDEX_FORMAT_VERSION, "seq_len": self.seq_len, "seed": self.seed,
                "shards": [Path(ds.prefix).name for ds in self.datasets]}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for ds in self.datasets:
            h.update(np.ascontiguousarray(ds.sizes, dtype=np.int32).tobytes())
            h.update(b"|")
        return h.hexdigest()[:32]

    def _usable_cache_dir(self, cache_dir: str | Path | None) -> Path | None:
        if cache_dir is None:
            return None
        path = Path(cache_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as err:
            logger.warning("index cache %s unusable (%s); building indices in memory", path, err)
            return None
        return path

    def _epoch_key(self, epoch: int) -> int:
        return 0 if self.seed is None else epoch  # unshuffled: every epoch is the same

    def index_paths(self, epoch: int) -> dict[str, Path]:
        """The cache files of ``epoch`` (``doc``, ``sample``, ``shuffle``); requires a cache_dir."""
        assert self.cache_dir is not None
        e = self._epoch_key(epoch)
        return {name: self.cache_dir / f"packed_{self.key}_e{e}_{name}.npy" for name in _INDEX_NAMES}

    def _indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        e = self._epoch_key(epoch)
        if e in self._epochs:
            self._epochs.move_to_end(e)
            return self._epochs[e]
        arrays = self._build(e) if self.cache_dir is None else self._load_or_build(e)
        self._epochs[e] = arrays
        while len(self._epochs) > _OPEN_EPOCHS:
            self._epochs.popitem(last=False)
        return arrays

    def _build(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.num_index_builds += 1
        return build_epoch_indices(self.sizes, self.seq_len, self.seed, epoch)

    def _load_or_build(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        paths = self.index_paths(epoch)
        if not all(p.exists() for p in paths.values()):
            with _file_lock(self.cache_dir / f"packed_{self.key}.lock"):
                if not all(p.exists() for p in paths.values()):  # another process may have built it
                    arrays = self._build(epoch)
                    for name, array in zip(_INDEX_NAMES, arrays, strict=True):
                        _save_atomic(paths[name], array)
                    self._write_description()
                    logger.info("built packed-sample indices of epoch %d in %s", epoch, self.cache_dir)
        return tuple(np.load(paths[name], mmap_mode="r") for name in _INDEX_NAMES)  # type: ignore[return-value]

    def _write_description(self) -> None:
        """A human-readable JSON next to the index files saying what they index."""
        path = self.cache_dir / f"packed_{self.key}.json"
        if path.exists():
            return
        desc = {"format_version": INDEX_FORMAT_VERSION, "seq_len": self.seq_len, "seed": self.seed,
                "shards": [str(Path(ds.prefix).resolve()) for ds in self.datasets],
                "num_documents": self.num_documents, "num_tokens": self.num_tokens,
                "samples_per_epoch": self.samples_per_epoch}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(desc, f, indent=2)
        os.replace(tmp, path)

    def document_order(self, epoch: int) -> np.ndarray:
        """Global document ids in the order epoch ``epoch`` concatenates them: [num_documents]."""
        return self._indices(epoch)[0]

    def sample_order(self, epoch: int) -> np.ndarray:
        """Window (unshuffled sample) index of each sample of epoch ``epoch``: [samples_per_epoch]."""
        return self._indices(epoch)[2]

    # ------------------------------------------------------------------ samples

    def __len__(self) -> int:
        return self.samples_per_epoch

    def document(self, doc: int) -> np.ndarray:
        """Tokens of global document id ``doc`` (read-only view)."""
        j = int(np.searchsorted(self._doc_starts, doc, side="right")) - 1
        return self.datasets[j].get(int(doc - self._doc_starts[j]))

    def window(self, epoch: int, k: int) -> np.ndarray:
        """Unshuffled window ``k`` of ``epoch``: tokens [k*T, k*T + T + 1) of its stream, int64 [T + 1]."""
        doc_idx, sample_idx, _ = self._indices(epoch)
        pos, offset = int(sample_idx[k, 0]), int(sample_idx[k, 1])
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        while filled < len(out):
            doc = int(doc_idx[pos])
            j = int(np.searchsorted(self._doc_starts, doc, side="right")) - 1
            ds, local = self.datasets[j], doc - int(self._doc_starts[j])
            take = min(int(ds.sizes[local]) - offset, len(out) - filled)
            out[filled : filled + take] = ds.get(local, offset, take)
            filled += take
            pos, offset = pos + 1, 0
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i`` (any i >= 0; epoch i // len(self)): int64 [seq_len + 1]."""
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        epoch, k = divmod(i, self.samples_per_epoch)
        return self.window(epoch, int(self._indices(epoch)[2][k]))

    def __repr__(self) -> str:
        return (f"PackedSamples(shards={len(self.datasets)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, seq_len={self.seq_len}, seed={self.seed}, "
                f"samples_per_epoch={self.samples_per_epoch})")
