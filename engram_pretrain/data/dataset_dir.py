"""A dataset directory written by ``python -m data_prep build`` (docs/data.md) and its Engram sidecar.

::

    <dir>/metadata.json            written last: its presence marks the dataset complete
    <dir>/tokenizer/               tokenizer.json + tokenizer_config.json + special_tokens_map.json
    <dir>/compression_map.npz      Engram tokenizer compression map (CompressionMap.save)
    <dir>/{train,valid}_NNNNN.bin/.idx   Megatron MMIDIDX shards; every document ends with the EOD token
    <dir>/engram_rows/             optional sidecar: precomputed Engram row ids (manifest.json written last)

Sidecar rows: for every shard and Engram layer, ``<shard>.layer<L>.npy`` holds ``[num_tokens, (N-1)*K]``
per-head row ids (no table offsets) of the shard's concatenated token stream, hashed exactly like
``NgramHasher`` on compressed ids. The row of position t depends on tokens t-N+1..t, so for a packed sample
that starts mid-stream the sidecar equals on-device hashing at every sample position j >= N-1; the first
N-1 positions of a sample read the pad id on device and must be recomputed there.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .indexed import IndexedDataset

if TYPE_CHECKING:
    from ..memory.compression import CompressionMap
    from ..memory.reference_hash import NgramHasher
    from ..model.config import ModelConfig

DATASET_FORMAT = "engram-pretrain-dataset/1"
METADATA_NAME = "metadata.json"
TOKENIZER_DIRNAME = "tokenizer"
COMPRESSION_MAP_NAME = "compression_map.npz"
SIDECAR_DIRNAME = "engram_rows"
SIDECAR_FORMAT = "engram-rows/1"
SIDECAR_MANIFEST = "manifest.json"


def compression_map_fingerprint(cmap: CompressionMap) -> str:
    """sha256 of the little-endian int64 lookup bytes followed by ``:<V'>``."""
    h = hashlib.sha256(np.ascontiguousarray(cmap.lookup, dtype="<i8").tobytes())
    h.update(f":{cmap.compressed_vocab_size}".encode())
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DatasetDir:
    """Read access to a complete dataset directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / METADATA_NAME
        if not meta_path.exists():
            hint = " (a build is in progress or was interrupted: rerun it)" \
                if (self.path / "progress.json").exists() else ""
            raise ValueError(f"{self.path}: no {METADATA_NAME}: incomplete or not a dataset directory{hint}; "
                             f"build one with `python -m data_prep build ... --out {self.path}`")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        if self.metadata.get("format") != DATASET_FORMAT:
            raise ValueError(f"{meta_path}: unsupported format {self.metadata.get('format')!r} "
                             f"(expected {DATASET_FORMAT})")

    def __repr__(self) -> str:
        splits = {s: v["num_tokens"] for s, v in self.metadata["splits"].items()}
        return f"DatasetDir({str(self.path)!r}, tokens={splits})"

    @property
    def eod_token_id(self) -> int:
        return int(self.metadata["eod_token_id"])

    @property
    def pad_token_id(self) -> int | None:
        return self.metadata.get("pad_token_id")

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.metadata["dtype"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIRNAME

    def shard_names(self, name: str) -> list[str]:
        splits = self.metadata["splits"]
        if name not in splits:
            raise ValueError(f"{self.path}: no split {name!r} (have {sorted(splits)})")
        return list(splits[name]["shards"])

    def split(self, name: str) -> list[IndexedDataset]:
        """The shards of split `name` ("train" / "valid"), memory-mapped, in order."""
        return [IndexedDataset(self.path / s) for s in self.shard_names(name)]

    def load_tokenizer(self) -> Any:
        """The tokenizer as a `transformers` fast tokenizer."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    @cached_property
    def _compression_map(self) -> CompressionMap:
        from tokenizers import Tokenizer

        from ..memory.compression import CompressionMap, tokenizer_fingerprint

        cmap = CompressionMap.load(self.path / COMPRESSION_MAP_NAME)
        want = self.metadata["tokenizer_fingerprint"]
        if cmap.tokenizer_fingerprint != want:
            raise ValueError(f"{self.path}: compression map was built for tokenizer "
                             f"{cmap.tokenizer_fingerprint}, the dataset was tokenized with {want}")
        have = tokenizer_fingerprint(Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json")))
        if have != want:
            raise ValueError(f"{self.tokenizer_dir}: tokenizer fingerprint {have} != {want} "
                             "recorded in metadata")
        fp = compression_map_fingerprint(cmap)
        if fp != self.metadata["compression_map_fingerprint"]:
            raise ValueError(f"{self.path}: {COMPRESSION_MAP_NAME} fingerprint {fp} != metadata "
                             f"{self.metadata['compression_map_fingerprint']}")
        return cmap

    def compression_map(self) -> CompressionMap:
        """The Engram compression map, verified against the tokenizer and metadata fingerprints."""
        return self._compression_map

    def sidecar(self, model_cfg: ModelConfig, checksums: bool = False) -> Sidecar | None:
        """The verified Engram row-id sidecar for `model_cfg`, or None when the dataset has none."""
        if not (self.path / SIDECAR_DIRNAME / SIDECAR_MANIFEST).exists():
            return None
        return Sidecar(self, verify_sidecar(self, model_cfg, checksums=checksums))


# ----------------------------------------------------------------------------- Engram sidecar


def sidecar_addressing(model_cfg: ModelConfig, cmap: CompressionMap) -> tuple[NgramHasher, np.ndarray | None]:
    """(hasher, raw -> compressed lookup over model vocab or None for identity), as the model addresses."""
    from ..memory.addressing_builder import build_addressing, build_hasher

    if not model_cfg.engram.layers:
        raise ValueError("model.engram.layers is empty: the model has no Engram layer to precompute rows for")
    a = build_addressing(model_cfg, cmap)
    lookup = None if a.compression_lookup is None else np.asarray(a.compression_lookup, dtype=np.int64)
    return build_hasher(model_cfg, a.compressed_vocab_size, a.pad_id), lookup


def rows_dtype(hasher: NgramHasher) -> np.dtype:
    """Smallest dtype holding every row id (< the largest prime table size)."""
    top = max(max(hasher.head_sizes(layer)) for layer in hasher.layer_ids)
    if top <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32) if top <= 1 << 31 else np.dtype(np.int64)


def sidecar_engram_spec(model_cfg: ModelConfig, cmap: CompressionMap) -> dict[str, Any]:
    """Everything the row ids depend on; the sidecar manifest must match it exactly."""
    e = model_cfg.engram
    hasher, _ = sidecar_addressing(model_cfg, cmap)
    return {
        "layers": [int(x) for x in e.layers],
        "max_ngram": e.max_ngram,
        "num_heads": e.num_heads,
        "base_table_size": model_cfg.engram_base_sizes(),
        "seed": e.seed,
        "pad_token_id": e.pad_token_id,
        "token_compression": e.token_compression,
        "reset_at_doc_boundary": e.reset_at_doc_boundary,
        "model_vocab_size": model_cfg.vocab_size,
        "compressed_vocab_size": hasher.compressed_vocab_size,
        "compressed_pad_id": hasher.pad_id,
        "head_sizes": {str(layer): hasher.head_sizes(layer) for layer in hasher.layer_ids},
        "multipliers": {str(layer): hasher.multipliers[layer].tolist() for layer in hasher.layer_ids},
        "dtype": rows_dtype(hasher).name,
    }


def stream_rows(tokens: np.ndarray, context: np.ndarray, hasher: NgramHasher, layer: int,
                lookup: np.ndarray | None, eod_id: int | None) -> np.ndarray:
    """Row ids of `tokens` [T] continuing a stream whose preceding tokens are `context` [<= N-1].

    Returns [T, (N-1)*K] int64. With `eod_id`, n-grams do not cross an EOD (``reset_at_doc_boundary``).
    An empty `context` means the stream starts here (positions before it read the pad id).
    """
    raw = np.concatenate([np.asarray(context, dtype=np.int64), np.asarray(tokens, dtype=np.int64)])
    ids = raw if lookup is None else lookup[raw]
    seg = None
    if eod_id is not None:
        from ..memory.reference_hash import segment_ids_from_eod

        seg = segment_ids_from_eod(raw[None, :], eod_id)
    rows = hasher.hash(ids[None, :], layer, seg)[0]  # [C + T, cols]
    return rows[len(context):]


class Sidecar:
    """Memory-mapped precomputed rows of a verified sidecar."""

    def __init__(self, dataset: DatasetDir, manifest: dict[str, Any]) -> None:
        self.dataset = dataset
        self.manifest = manifest
        self.dir = dataset.path / SIDECAR_DIRNAME
        e = manifest["engram"]
        self.layers: list[int] = e["layers"]
        self.num_columns = (e["max_ngram"] - 1) * e["num_heads"]
        self.valid_from = e["max_ngram"] - 1
        """Sample positions >= valid_from equal on-device rows; earlier ones must be recomputed."""

    def rows(self, shard: str, layer: int) -> np.ndarray:
        """[num_tokens, (N-1)*K] row ids of `shard` (e.g. "train_00000") for Engram `layer` (read-only)."""
        entry = self.manifest["shards"].get(shard)
        if entry is None or str(layer) not in entry["layers"]:
            raise ValueError(f"sidecar has no rows for shard {shard!r} layer {layer}")
        return np.load(self.dir / entry["layers"][str(layer)]["file"], mmap_mode="r")


def verify_sidecar(dataset: DatasetDir | str | Path, model_cfg: ModelConfig, checksums: bool = True) -> dict:
    """Check the sidecar matches `model_cfg`, the compression map and the shards; returns the manifest.

    Raises ValueError naming the mismatch (config key, compression map, shard, or file checksum).
    `checksums=False` skips hashing the row files (sizes and shapes are still checked).
    """
    ds = dataset if isinstance(dataset, DatasetDir) else DatasetDir(dataset)
    side = ds.path / SIDECAR_DIRNAME
    mpath = side / SIDECAR_MANIFEST
    if not mpath.exists():
        raise ValueError(f"{ds.path}: no Engram sidecar ({mpath} missing); "
                         f"write one with `python -m data_prep sidecar {ds.path} --config <run.yaml>`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{mpath}: unsupported format {manifest.get('format')!r}")
    cmap = ds.compression_map()
    fp = compression_map_fingerprint(cmap)
    if manifest["compression_map_fingerprint"] != fp:
        raise ValueError(f"{mpath}: sidecar was computed with compression map "
                         f"{manifest['compression_map_fingerprint']}, the dataset's map is {fp}; "
                         "rewrite the sidecar")
    want = sidecar_engram_spec(model_cfg, cmap)
    have = manifest["engram"]
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
        details = "; ".join(f"{k}: sidecar {have.get(k)!r} != config {want.get(k)!r}" for k in diff[:4])
        raise ValueError(f"{mpath}: Engram sidecar does not match the model config ({details}); "
                         f"rewrite it with `python -m data_prep sidecar` or set data.engram_sidecar: false")
    if manifest["dataset"] != {"created": ds.metadata["created"],
                               "run_fingerprint": ds.metadata["build"]["run_fingerprint"]}:
        raise ValueError(f"{mpath}: sidecar belongs to another build of {ds.path}; rewrite it")
    cols = (want["max_ngram"] - 1) * want["num_heads"]
    for split in ds.metadata["splits"]:
        for shard in ds.shard_names(split):
            entry = manifest["shards"].get(shard)
            if entry is None:
                raise ValueError(f"{mpath}: no rows for shard {shard}")
            n = IndexedDataset(ds.path / shard).num_tokens
            if entry["num_tokens"] != n:
                raise ValueError(f"{mpath}: shard {shard} has {n} tokens, sidecar {entry['num_tokens']}")
            for layer in want["layers"]:
                f = entry["layers"].get(str(layer))
                if f is None:
                    raise ValueError(f"{mpath}: no rows for shard {shard} layer {layer}")
                path = side / f["file"]
                if not path.exists():
                    raise ValueError(f"{path}: sidecar row file missing")
                arr = np.load(path, mmap_mode="r")
                if arr.shape != (n, cols) or arr.dtype != np.dtype(want["dtype"]):
                    raise ValueError(f"{path}: shape {arr.shape} {arr.dtype}, "
                                     f"expected {(n, cols)} {want['dtype']}")
                if checksums and file_sha256(path) != f["sha256"]:
                    raise ValueError(f"{path}: sha256 checksum mismatch (corrupted or modified)")
    return manifest
