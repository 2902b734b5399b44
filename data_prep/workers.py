"""Tokenizing pieces, in-process or in worker processes, delivered in piece order.

Each piece is read, validated, split into train/valid by a keyed hash of each document's bytes, and
tokenized in batches with the Rust tokenizer (one thread per worker). Worker ``w`` of ``W`` takes pieces
``start + w, start + w + W, ...`` and streams batches into its own bounded queue; the main process reads
the queues round-robin, piece by piece, so the output order (and the dataset) never depends on the
number of workers and memory stays bounded by ``W * QUEUE_DEPTH`` batches.

This module imports neither torch nor transformers, so spawned workers start fast and stay small.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .sources import Piece, PieceReader, ReadOptions
from .validation import DataError, SourceStats

QUEUE_DEPTH = 4
"""Batches a worker may run ahead of the writer."""


def is_valid_document(data: bytes, threshold: int, key: bytes) -> bool:
    """Deterministic split: keyed blake2b of the document's UTF-8 bytes below `threshold` (of 2**64)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little") < threshold


def split_threshold(valid_fraction: float) -> int:
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    return int(valid_fraction * 2**64)


def split_key(seed: int) -> bytes:
    return f"engram-split-{seed}".encode()


@dataclass
class Batch:
    """Tokenized documents of one piece, per split: flat tokens (EOD-terminated documents) and sizes."""

    piece: int
    train_tokens: np.ndarray
    train_sizes: np.ndarray
    valid_tokens: np.ndarray
    valid_sizes: np.ndarray
    stats: SourceStats = field(default_factory=SourceStats)
    position: int = 0
    """Input bytes of the piece consumed so far."""
    done: bool = False
    """Last batch of the piece."""


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything a worker needs (picklable)."""

    tokenizer_json: str
    eod_token_id: int
    dtype: str
    read: ReadOptions
    valid_fraction: float
    split_seed: int
    strict: bool
    batch_bytes: int = 1 << 20


class PieceTokenizer:
    """Turns a piece into `Batch`es."""

    def __init__(self, s: TokenizeSettings) -> None:
        from tokenizers import Tokenizer

        self.s = s
        self.tok = Tokenizer.from_file(s.tokenizer_json)
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not an EOD
        self._encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        self._threshold = split_threshold(s.valid_fraction)
        self._key = split_key(s.split_seed)
        self._dtype = np.dtype(s.dtype)

    def run(self, index: int, piece: Piece) -> Iterator[Batch]:
        reader = PieceReader(piece, self.s.read)
        stats = SourceStats()
        texts: list[str] = []
        datas: list[bytes] = []
        size = 0
        for text, data, reason, location in reader:
            if reason is not None:
                if self.s.strict:
                    raise DataError(f"{location}: {reason} (source {piece.source!r}; --strict)")
                stats.skip(reason, location or piece.source)
                continue
            texts.append(text)
            datas.append(data)
            size += len(data)
            if size >= self.s.batch_bytes:
                yield self._batch(index, texts, datas, stats, reader.position, piece)
                texts, datas, size, stats = [], [], 0, SourceStats()
        batch = self._batch(index, texts, datas, stats, piece.nbytes, piece)
        batch.done = True
        yield batch

    def _batch(self, index: int, texts: list[str], datas: list[bytes], stats: SourceStats, position: int,
               piece: Piece) -> Batch:
        eod = self.s.eod_token_id
        flat: dict[bool, list[int]] = {False: [], True: []}
        sizes: dict[bool, list[int]] = {False: [], True: []}
        encodings = self._encode(texts, add_special_tokens=False) if texts else []
        for enc, data in zip(encodings, datas, strict=True):
            ids = enc.ids
            if not ids:
                stats.skip("empty", piece.source)
                continue
            ids.append(eod)
            valid = self._threshold > 0 and is_valid_document(data, self._threshold, self._key)
            flat[valid].extend(ids)
            sizes[valid].append(len(ids))
            stats.documents += 1
            stats.tokens += len(ids)
            stats.bytes += len(data)
        return Batch(index, np.array(flat[False], dtype=self._dtype), np.array(sizes[False], dtype=np.int64),
                     np.array(flat[True], dtype=self._dtype), np.array(sizes[True], dtype=np.int64),
                     stats, position)


# ----------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the parent dies (a killed build leaves no orphan workers)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _put(q: mp.Queue, msg: tuple, parent: int) -> None:
    while True:
        try:
            q.put(msg, timeout=1.0)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(1)


def _worker_main(w: int, num_workers: int, start: int, pieces: list[Piece], settings: TokenizeSettings,
                 q: mp.Queue, parent: int) -> None:
    _die_with_parent()
    try:
        tk = PieceTokenizer(settings)
        for i in range(start + w, len(pieces), num_workers):
            for batch in tk.run(i, pieces[i]):
                _put(q, ("batch", batch), parent)
    except DataError as err:
        _put(q, ("data_error", str(err)), parent)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        _put(q, ("error", traceback.format_exc()), parent)


def iter_batches(pieces: list[Piece], start: int, settings: TokenizeSettings,
                 workers: int) -> Iterator[Batch]:
    """Batches of pieces ``start..`` in order; ``workers == 0`` tokenizes in this process."""
    if workers <= 0:
        tk = PieceTokenizer(settings)
        for i in range(start, len(pieces)):
            yield from tk.run(i, pieces[i])
        return
    num = min(workers, max(1, len(pieces) - start))
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue(maxsize=QUEUE_DEPTH) for _ in range(num)]
    saved = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")  # inherited by the workers
    procs = [ctx.Process(target=_worker_main, args=(w, num, start, pieces, settings, queues[w], os.getpid()),
                         name=f"data_prep-worker-{w}", daemon=True) for w in range(num)]
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        for i in range(start, len(pieces)):
            w = (i - start) % num
            while True:
                kind, payload = _get(queues[w], procs[w])
                if kind == "data_error":
                    raise DataError(payload)
                if kind == "error":
                    raise RuntimeError(f"data_prep worker {w} failed:\n{payload}")
                assert payload.piece == i, (payload.piece, i)
                yield payload
                if payload.done:
                    break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        for q in queues:
            q.cancel_join_thread()
            q.close()


def _get(q: mp.Queue, proc: mp.process.BaseProcess) -> tuple:
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                try:
                    return q.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError(
                        f"{proc.name} exited with code {proc.exitcode} before finishing") from None
