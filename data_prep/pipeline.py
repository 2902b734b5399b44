"""``data_prep build``: inputs -> tokenizer -> train/valid MMIDIDX shards -> ``metadata.json`` (written last).

The dataset is a deterministic function of the inputs and the options (never of ``workers``): pieces are
read in sorted order and documents keep their input order within each split. Reruns are cheap: a complete
dataset with the same inputs and options is left alone, and an interrupted build resumes from its last
checkpoint (see `data_prep.sharding`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from engram_pretrain.data.dataset_dir import (
    COMPRESSION_MAP_NAME,
    DATASET_FORMAT,
    METADATA_NAME,
    SIDECAR_DIRNAME,
    compression_map_fingerprint,
)
from engram_pretrain.data.indexed import best_fitting_dtype

from .sharding import PROGRESS_NAME, SPLITS, ShardWriter, clean_stale_shards, write_json_atomic
from .sources import DEFAULT_CODE_BYTES, Piece, PieceReader, ReadOptions, resolve_inputs
from .validation import SourceStats, merge_stats, total_skipped
from .workers import TokenizeSettings, iter_batches

log = logging.getLogger(__name__)

TOKENIZER_SPEC_FILE = "data_prep.json"
"""Inside ``<out>/tokenizer``: the ``--tokenizer`` spec (and BPE vocab size) it was installed from."""


@dataclass
class BuildOptions:
    """Options of ``data_prep build`` (CLI flags of the same names)."""

    out: Path
    """Output dataset directory."""
    inputs: list[str] = field(default_factory=lambda: ["default"])
    """Input specs: files, directories, globs, ``hf:NAME``, ``default``."""
    tokenizer: str = "bpe"
    """``bpe`` (train), ``deepseek-v4``, a tokenizer/dataset directory, a tokenizer.json or an HF hub name."""
    vocab_size: int = 4096
    """Vocabulary size of a trained BPE."""
    eod_token: str | None = None
    """End-of-document token; None takes the tokenizer's ``eos_token``."""
    read: ReadOptions = field(default_factory=ReadOptions)
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    """Tokenizer worker processes; 0 tokenizes in the main process."""
    valid_fraction: float = 0.01
    """Expected fraction of documents in the validation split."""
    split_seed: int = 0
    """Key of the document hash that assigns documents to splits."""
    shard_tokens: int = 100_000_000
    """Shards close (both splits) at the first piece boundary after this many tokens."""
    piece_bytes: int = 16 << 20
    """Size of a unit of parallel work within uncompressed line files and of whole-file groups."""
    batch_bytes: int = 1 << 20
    """Text bytes per tokenizer call."""
    tokenizer_train_bytes: int = 200 << 20
    """BPE training reads at most this many document bytes (the first ones, in input order)."""
    default_code_bytes: int = DEFAULT_CODE_BYTES
    """Python stdlib bytes in the ``default`` corpus."""
    strict: bool = False
    """Fail on the first bad record (naming file and line) instead of skipping it."""
    overwrite: bool = False
    """Replace an existing dataset (or a tokenizer from another spec) in ``out``."""
    progress: bool | None = None
    """Progress bar: True/False, or None for "when stderr is a terminal"."""


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("engram-pretrain", "tokenizers", "numpy", "transformers", "pyarrow", "zstandard", "datasets"):
        try:
            out[pkg.replace("-", "_")] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _training_texts(pieces: list[Piece], read: ReadOptions, max_bytes: int) -> Iterator[str]:
    total = 0
    for piece in pieces:
        for text, data, reason, _ in PieceReader(piece, read):
            if reason is None:
                yield text
                total += len(data)
                if total >= max_bytes:
                    return


def _remove_dataset(out: Path) -> None:
    for name in (METADATA_NAME, PROGRESS_NAME, COMPRESSION_MAP_NAME):
        (out / name).unlink(missing_ok=True)
    for name in ("tokenizer", SIDECAR_DIRNAME):
        shutil.rmtree(out / name, ignore_errors=True)
    clean_stale_shards(out, keep=set())


def prepare_tokenizer(opts: BuildOptions, pieces: list[Piece]):
    """Install (or reuse) ``<out>/tokenizer`` + compression map; returns (TokenizerInfo, CompressionMap)."""
    from .tokenizer import install_tokenizer, load_installed

    wanted = {"spec": opts.tokenizer, "vocab_size": opts.vocab_size if opts.tokenizer == "bpe" else None}
    spec_path = opts.out / "tokenizer" / TOKENIZER_SPEC_FILE
    installed = load_installed(opts.out, opts.eod_token)
    if installed is not None and spec_path.exists():
        if json.loads(spec_path.read_text()) == wanted:
            return installed
        if not opts.overwrite:
            have = json.loads(spec_path.read_text())
            raise ValueError(f"{opts.out} holds a tokenizer from {have}, not {wanted}; "
                             "pass --overwrite to replace the dataset, or choose another --out")
        _remove_dataset(opts.out)
    texts = None
    if opts.tokenizer == "bpe":
        texts = _training_texts(pieces, opts.read, opts.tokenizer_train_bytes)
    install_tokenizer(opts.tokenizer, opts.out, texts, opts.vocab_size, opts.eod_token)
    spec_path.write_text(json.dumps(wanted) + "\n")
    installed = load_installed(opts.out, opts.eod_token)
    assert installed is not None
    return installed


def _run_fingerprint(opts: BuildOptions, pieces: list[Piece], info, dtype) -> str:
    payload = {
        "format": DATASET_FORMAT,
        "pieces": [p.identity() for p in pieces],
        "tokenizer": info.fingerprint,
        "eod": info.eod_token_id,
        "dtype": dtype.name,
        "read": asdict(opts.read),
        "valid_fraction": opts.valid_fraction,
        "split_seed": opts.split_seed,
        "shard_tokens": opts.shard_tokens,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_dataset(opts: BuildOptions) -> dict:
    """Build (or resume, or confirm) the dataset in ``opts.out``; returns its metadata."""
    out = Path(opts.out)
    opts.out = out
    out.mkdir(parents=True, exist_ok=True)
    if opts.overwrite and (out / METADATA_NAME).exists():
        _remove_dataset(out)
    pieces = resolve_inputs(opts.inputs, opts.read, opts.piece_bytes, opts.default_code_bytes)
    info, cmap = prepare_tokenizer(opts, pieces)
    dtype = best_fitting_dtype(info.vocab_size)
    run_fp = _run_fingerprint(opts, pieces, info, dtype)

    meta_path = out / METADATA_NAME
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("build", {}).get("run_fingerprint") == run_fp:
            log.info("%s is complete and up to date (same inputs and options); nothing to do", out)
            return meta
        if not opts.overwrite:
            raise ValueError(f"{out} holds a dataset built from other inputs or options; pass --overwrite "
                             "(make data DATA_ARGS=--overwrite) to replace it, or choose another --out")
        meta_path.unlink()

    resume = None
    progress_path = out / PROGRESS_NAME
    if progress_path.exists():
        state = json.loads(progress_path.read_text())
        if state.get("run_fingerprint") == run_fp:
            resume = state
            log.info("resuming after piece %d of %d (%s shards kept)", state["next_piece"], len(pieces),
                     sum(len(v) for v in state["shards"].values()))
        else:
            log.warning("discarding an interrupted build of other inputs/options in %s", out)
    keep = {s for v in (resume or {}).get("shards", {}).values() for s in v}
    removed = clean_stale_shards(out, keep)
    if removed:
        log.info("removed %d incomplete shard file(s) of an interrupted run", len(removed))
    if resume is None:
        progress_path.unlink(missing_ok=True)

    start = resume["next_piece"] if resume else 0
    stats = {k: SourceStats.from_dict(v) for k, v in (resume or {}).get("stats", {}).items()}
    writer = ShardWriter(out, dtype, opts.shard_tokens, resume)
    settings = TokenizeSettings(tokenizer_json=str(info.json_path), eod_token_id=info.eod_token_id,
                                dtype=dtype.name, read=opts.read, valid_fraction=opts.valid_fraction,
                                split_seed=opts.split_seed, strict=opts.strict, batch_bytes=opts.batch_bytes)

    def checkpoint(next_piece: int) -> None:
        writer.close_shards()
        state = {"run_fingerprint": run_fp, "next_piece": next_piece,
                 "stats": {k: v.to_dict() for k, v in stats.items()}, **writer.state()}
        write_json_atomic(progress_path, state)

    t0 = time.perf_counter()
    new_tokens = 0
    total = sum(p.nbytes for p in pieces[start:])
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True,
               disable=None if opts.progress is None else not opts.progress)
    offsets = [0]
    for p in pieces[start:]:
        offsets.append(offsets[-1] + p.nbytes)
    seen = 0
    last = 0.0
    batches = iter_batches(pieces, start, settings, opts.workers)
    try:
        for batch in batches:
            writer.write("train", batch.train_tokens, batch.train_sizes)
            writer.write("valid", batch.valid_tokens, batch.valid_sizes)
            merge_stats(stats, {pieces[batch.piece].source: batch.stats})
            new_tokens += batch.stats.tokens
            pos = offsets[batch.piece - start] + min(batch.position, pieces[batch.piece].nbytes)
            if pos > seen:
                bar.update(pos - seen)
                seen = pos
            now = time.perf_counter()
            if now - last > 0.5:
                bar.set_postfix_str(f"{new_tokens / max(now - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
                last = now
            if batch.done and writer.checkpoint_due():
                checkpoint(batch.piece + 1)
        writer.close_shards()
    except BaseException:
        writer.abort()
        raise
    finally:
        batches.close()  # stops the workers now, not when the traceback is freed
        bar.close()
    elapsed = time.perf_counter() - t0

    meta = {
        "format": DATASET_FORMAT,
        "vocab_size": info.vocab_size,
        "eod_token_id": info.eod_token_id,
        "eod_token": info.eod_token,
        "pad_token_id": info.pad_token_id,
        "dtype": dtype.name,
        "tokenizer_fingerprint": info.fingerprint,
        "compression_map_fingerprint": compression_map_fingerprint(cmap),
        "compressed_vocab_size": cmap.compressed_vocab_size,
        "splits": {s: {"shards": writer.shards[s], **writer.counts[s]} for s in SPLITS},
        "num_documents": sum(writer.counts[s]["num_documents"] for s in SPLITS),
        "num_tokens": sum(writer.counts[s]["num_tokens"] for s in SPLITS),
        "sources": {k: stats[k].to_dict() for k in sorted(stats)},
        "skipped": total_skipped(stats),
        "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build": {
            "inputs": list(opts.inputs),
            "tokenizer": opts.tokenizer,
            "text_field": opts.read.text_field,
            "text_unit": opts.read.text_unit,
            "max_document_bytes": opts.read.max_document_bytes,
            "valid_fraction": opts.valid_fraction,
            "split_seed": opts.split_seed,
            "shard_tokens": opts.shard_tokens,
            "piece_bytes": opts.piece_bytes,
            "num_pieces": len(pieces),
            "run_fingerprint": run_fp,
        },
    }
    write_json_atomic(meta_path, meta)
    progress_path.unlink(missing_ok=True)
    log.info("%s", format_report(meta, elapsed, new_tokens))
    return meta


def format_report(meta: dict, elapsed: float | None = None, new_tokens: int | None = None) -> str:
    """A human summary: splits, per-source counts and skipped records by reason."""
    lines = [f"dataset: {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens "
             f"(vocab {meta['vocab_size']}, {meta['dtype']}, EOD id {meta['eod_token_id']})"]
    if elapsed and new_tokens is not None:
        lines[0] += f"; {new_tokens:,} tokens in {elapsed:.1f}s = {new_tokens / elapsed / 1e6:.2f}M tok/s"
    for s, v in meta["splits"].items():
        lines.append(f"  {s:5s}: {len(v['shards'])} shard(s), {v['num_documents']:,} documents, "
                     f"{v['num_tokens']:,} tokens")
    for name, src in meta["sources"].items():
        skipped = ", ".join(f"{r}={n}" for r, n in src["skipped"].items()) or "none"
        lines.append(f"  source {name}: {src['documents']:,} documents, {src['tokens']:,} tokens; "
                     f"skipped: {skipped}")
        for reason, locs in src.get("examples", {}).items():
            lines.append(f"    {reason}: e.g. {', '.join(locs)}")
    return "\n".join(lines)
