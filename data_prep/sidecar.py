"""``data_prep sidecar``: precompute Engram row ids of every shard for one model config.

Writes ``<dataset>/engram_rows/<shard>.layer<L>.npy`` ([num_tokens, (N-1)*K], the smallest dtype that holds
the largest prime table size) and ``manifest.json`` last (temp file + rename) with the Engram config subset,
the compression-map fingerprint, the dataset build it belongs to and sha256 checksums. Rows are computed in
chunks of the concatenated token stream with N-1 tokens of overlap, so memory is bounded.
See `engram_pretrain.data.dataset_dir` for the caveat at sample starts and for `verify_sidecar`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engram_pretrain.data.dataset_dir import (
    SIDECAR_DIRNAME,
    SIDECAR_FORMAT,
    SIDECAR_MANIFEST,
    DatasetDir,
    compression_map_fingerprint,
    file_sha256,
    sidecar_addressing,
    sidecar_engram_spec,
    stream_rows,
)
from engram_pretrain.data.indexed import IndexedDataset
from engram_pretrain.model.config import ModelConfig

from .sharding import write_json_atomic

log = logging.getLogger(__name__)


def write_sidecar(dataset_dir: str | Path, model_cfg: ModelConfig, chunk_tokens: int = 1 << 20,
                  progress: bool | None = None) -> dict:
    """Write (replacing any previous) the Engram row-id sidecar of a dataset; returns the manifest."""
    ds = DatasetDir(dataset_dir)
    cmap = ds.compression_map()
    spec = sidecar_engram_spec(model_cfg, cmap)
    hasher, lookup = sidecar_addressing(model_cfg, cmap)
    if lookup is not None and len(lookup) < ds.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} < dataset vocab_size={ds.vocab_size}")
    eod = ds.eod_token_id if model_cfg.engram.reset_at_doc_boundary else None
    dtype = np.dtype(spec["dtype"])
    context_len = hasher.max_ngram - 1
    final = ds.path / SIDECAR_DIRNAME
    tmp = ds.path / f".{SIDECAR_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards = [s for split in ds.metadata["splits"] for s in ds.shard_names(split)]
    total = sum(IndexedDataset(ds.path / s).num_tokens for s in shards) * len(hasher.layer_ids)
    entries: dict[str, dict] = {}
    try:
        with tqdm(total=total, unit="tok", unit_scale=True, desc="engram rows",
                  disable=None if progress is None else not progress) as bar:
            for shard in shards:
                tokens = IndexedDataset(ds.path / shard).tokens()
                n = int(tokens.size)
                layers = {}
                for layer in hasher.layer_ids:
                    name = f"{shard}.layer{layer}.npy"
                    out = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype,
                                                    shape=(n, hasher.num_columns))
                    for s in range(0, n, chunk_tokens):
                        e = min(n, s + chunk_tokens)
                        rows = stream_rows(tokens[s:e], tokens[max(0, s - context_len):s], hasher, layer,
                                           lookup, eod)
                        out[s:e] = rows.astype(dtype)
                        bar.update(e - s)
                    out.flush()
                    del out
                    layers[str(layer)] = {"file": name, "sha256": file_sha256(tmp / name)}
                entries[shard] = {"num_tokens": n, "layers": layers}
        manifest = {
            "format": SIDECAR_FORMAT,
            "engram": spec,
            "compression_map_fingerprint": compression_map_fingerprint(cmap),
            "tokenizer_fingerprint": ds.metadata["tokenizer_fingerprint"],
            "dataset": {"created": ds.metadata["created"],
                        "run_fingerprint": ds.metadata["build"]["run_fingerprint"]},
            "valid_from_position": context_len,
            "shards": entries,
        }
        write_json_atomic(tmp / SIDECAR_MANIFEST, manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %d shard(s) x %d layer(s), %s rows", final, len(shards), len(hasher.layer_ids), dtype)
    return manifest
