"""Megatron-compatible indexed datasets (``.bin`` + ``.idx``, the MMIDIDX format).

Byte layout of ``<prefix>.idx`` (little endian), as written by Megatron-LM / Megatron-Core and GPT-NeoX::

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          <Q        1
    dtype code       <B        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count   <Q        S
    document count   <Q        D + 1 (length of document_indices)
    sizes            int32[S]  tokens per sequence
    pointers         int64[S]  byte offset of each sequence in ``<prefix>.bin``
    document_indices int64[D+1] sequence index where each document ends, starting with 0

``<prefix>.bin`` is the plain concatenation of all sequences in the index dtype. Here each document is
one sequence, so ``document_indices == arange(S + 1)``.

While building, both files are written as ``.tmp`` and renamed at :meth:`IndexedDatasetBuilder.finalize`
(``.bin`` first, ``.idx`` last): a prefix whose ``.idx`` exists is complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def dtype_code(dtype: np.dtype | type) -> int:
    """Megatron dtype code of ``dtype`` (ValueError for dtypes the format cannot store)."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise ValueError(f"dtype {dt} is not storable in an MMIDIDX index; use one of {list(_CODE_OF)}")
    return _CODE_OF[dt]


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """Smallest token dtype for ``vocab_size`` (Megatron's rule: uint16 below 65500, else int32)."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def data_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def is_complete(prefix: str | Path) -> bool:
    """True when both ``.bin`` and ``.idx`` exist (``.idx`` is renamed into place last)."""
    return index_file(prefix).exists() and data_file(prefix).exists()


class IndexedDatasetBuilder:
    """Streams documents into ``<prefix>.bin.tmp`` and writes the index at :meth:`finalize`.

    Memory use is O(number of documents) for sizes; token data goes straight to disk.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._idx_tmp = Path(f"{self.prefix}.idx.tmp")
        self._bin_tmp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._bin_tmp, "wb")  # closed in finalize/abort
        self._sizes: list[int] = []
        self.num_tokens = 0
        self._done = False

    def __len__(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document as one sequence (tokens in the builder dtype; range-checked for ints)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D token array, got shape {arr.shape}")
        self._write(arr)
        self._sizes.append(int(arr.size))

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray | list[int]) -> None:
        """Append many documents: `tokens` [sum(sizes)] is their concatenation, `sizes` their lengths."""
        sizes = np.asarray(sizes, dtype=np.int64)
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or int(sizes.sum()) != tokens.size or (sizes.size and sizes.min() < 0):
            raise ValueError(f"sizes (sum {int(sizes.sum())}) do not partition {tokens.size} tokens")
        self._write(tokens)
        self._sizes.extend(sizes.tolist())

    def _write(self, arr: np.ndarray) -> None:
        if self._done:
            raise RuntimeError(f"builder for {self.prefix} is already finalized or aborted")
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(f"token ids [{lo}, {hi}] do not fit dtype {self.dtype}")
            arr = arr.astype(self.dtype)
        self._file.write(np.ascontiguousarray(arr).tobytes())
        self.num_tokens += int(arr.size)

    def finalize(self) -> None:
        """Write the index and rename both files into place (``.bin`` first, ``.idx`` last)."""
        if self._done:
            raise RuntimeError(f"builder for {self.prefix} is already finalized or aborted")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_file(self.prefix))
        os.replace(self._idx_tmp, index_file(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporary files; nothing that looks complete is left behind."""
        if not self._file.closed:
            self._file.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._done:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Memory-mapped reader of one ``<prefix>.bin``/``.idx`` pair (Megatron, GPT-NeoX or ours)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = index_file(self.prefix), data_file(self.prefix)
        for p in (idx_path, bin_path):
            if not p.exists():
                raise ValueError(f"indexed dataset file {p} does not exist (incomplete or missing shard)")
        raw = np.zeros(0, np.uint8)
        if idx_path.stat().st_size:
            raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        if raw.size < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated index ({raw.size} bytes < {_HEADER.size}-byte header)")
        magic, version, code, seq_count, doc_count = _HEADER.unpack(bytes(raw[: _HEADER.size]))
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: bad magic {magic!r}, not an MMIDIDX index")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        need = _HEADER.size + seq_count * (4 + 8) + doc_count * 8
        if raw.size < need:
            raise ValueError(f"{idx_path}: truncated index ({raw.size} bytes, header says {need})")
        off = _HEADER.size
        self.sizes: np.ndarray = np.frombuffer(raw, dtype=np.int32, count=seq_count, offset=off)
        off += seq_count * 4
        self.pointers: np.ndarray = np.frombuffer(raw, dtype=np.int64, count=seq_count, offset=off)
        off += seq_count * 8
        self.document_indices: np.ndarray = np.frombuffer(raw, dtype=np.int64, count=doc_count, offset=off)
        self._idx_raw = raw
        item = self.dtype.itemsize
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_size = bin_path.stat().st_size
        expected = (int(self.pointers[-1]) + int(self.sizes[-1]) * item) if seq_count else 0
        if bin_size < expected:
            raise ValueError(f"{bin_path}: truncated data file ({bin_size} bytes, index needs {expected})")
        self._bin = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (a read-only view of the mmap)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {n} sequences")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"[{offset}, {offset + length}) out of range for sequence {i} of size {size}")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def tokens(self) -> np.ndarray:
        """All tokens of the shard as one flat read-only array (the ``.bin`` file)."""
        return self._bin[: self.num_tokens] if len(self) else self._bin[:0]

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.prefix)!r}, sequences={len(self)}, tokens={self.num_tokens})"
