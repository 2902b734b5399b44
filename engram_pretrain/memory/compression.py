"""Engram tokenizer compression P: raw token id -> compressed id (paper §2.2, reference demo).

Bit-compatible with `CompressedTokenizer` of the reference demo (`engram_demo_v1.py`):
for raw ids 0..len(tokenizer)-1, `text = decode([id], skip_special_tokens=False)`; the key is the raw
token string when `text` contains U+FFFD (a partial UTF-8 byte token), else `normalize(text)`, or
`text` itself when that is empty. Compressed ids are numbered by first appearance of their key while
scanning raw ids upward. Negative ids (e.g. -100 label padding) pass through `compress` unchanged.
Compression only feeds Engram addressing; the backbone embeds raw ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

if TYPE_CHECKING:  # torch is imported lazily: data-prep workers never need it
    import torch

_SENTINEL = "\ue000"
_FORMAT = "engram-compression-map"
_FORMAT_VERSION = 1
_FINGERPRINT_TAG = "engram-vocab-v1"
_IDENTITY_PREFIX = "identity:"


@functools.cache
def text_normalizer() -> normalizers.Normalizer:
    """NFKC -> NFD -> strip accents -> lowercase -> collapse [ \\t\\r\\n]+ -> keep a lone space -> strip."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def _vocab_len(tokenizer: Any) -> int:
    """len(tokenizer) including added/special tokens (the reference iterates range(len(tokenizer)))."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.get_vocab_size(with_added_tokens=True)
    try:
        return len(tokenizer)
    except TypeError:
        pass
    if hasattr(tokenizer, "get_vocab_size"):
        try:
            return int(tokenizer.get_vocab_size(with_added_tokens=True))
        except TypeError:
            return int(tokenizer.get_vocab_size())
    raise ValueError(f"cannot determine the vocabulary size of {type(tokenizer).__name__}")


def _token_strings(tokenizer: Any, vocab_size: int) -> list[str | None]:
    """Raw token string of every id 0..V-1 (`convert_ids_to_tokens` / `id_to_token`)."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        to_token = tokenizer.convert_ids_to_tokens
    elif hasattr(tokenizer, "id_to_token"):
        to_token = tokenizer.id_to_token
    else:
        raise ValueError(f"{type(tokenizer).__name__} has neither convert_ids_to_tokens nor id_to_token")
    return [to_token(i) for i in range(vocab_size)]


def _batched_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers` backend when batch-decoding it is exactly `tokenizer.decode([id])`, else None."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if not type(tokenizer).__module__.startswith("transformers") or not hasattr(
        tokenizer, "backend_tokenizer"
    ):
        return None
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    plain_decode = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerFast.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    )
    # transformers may post-process with clean_up_tokenization; fall back to its own decode then.
    if plain_decode and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.backend_tokenizer
    return None


def _decoded_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """decode([id], skip_special_tokens=False) for every id 0..V-1."""
    backend = _batched_backend(tokenizer)
    if backend is not None:
        return backend.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab_size)]


def _fingerprint_of_tokens(tokens: list[str | None]) -> str:
    payload = json.dumps([_FINGERPRINT_TAG, len(tokens), tokens], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the ordered token strings of ids 0..V-1 (same through `tokenizers` and `transformers`)."""
    return _fingerprint_of_tokens(_token_strings(tokenizer, _vocab_len(tokenizer)))


@dataclass(eq=False)
class CompressionMap:
    """Surjective map raw id -> compressed id.

    Attributes:
        lookup: int64 [vocab_size], raw id -> compressed id in [0, compressed_vocab_size).
        compressed_vocab_size: V' (number of distinct keys).
        vocab_size: V (raw ids 0..V-1).
        tokenizer_fingerprint: `tokenizer_fingerprint(tokenizer)` of the tokenizer it was built for,
            or "identity:<V>" for the `w/o token compress` identity map.
    """

    lookup: np.ndarray
    compressed_vocab_size: int
    vocab_size: int
    tokenizer_fingerprint: str
    _torch_lookup: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.lookup = np.ascontiguousarray(self.lookup, dtype=np.int64)
        self.compressed_vocab_size = int(self.compressed_vocab_size)
        self.vocab_size = int(self.vocab_size)
        if self.lookup.ndim != 1 or self.lookup.shape[0] != self.vocab_size:
            raise ValueError(f"lookup must have shape ({self.vocab_size},), got {self.lookup.shape}")
        if self.vocab_size and (self.lookup.min() < 0 or self.lookup.max() >= self.compressed_vocab_size):
            raise ValueError(f"lookup values must lie in [0, {self.compressed_vocab_size})")
        if np.bincount(self.lookup, minlength=self.compressed_vocab_size).min(initial=1) == 0:
            raise ValueError("lookup is not surjective onto [0, compressed_vocab_size)")

    @property
    def reduction(self) -> float:
        """Fraction of the vocabulary removed: 1 - V'/V."""
        return 1.0 - self.compressed_vocab_size / self.vocab_size

    @property
    def is_identity(self) -> bool:
        """True for the `w/o token compress` ablation map (P = identity)."""
        return self.tokenizer_fingerprint.startswith(_IDENTITY_PREFIX)

    def compress_id(self, raw_id: int) -> int:
        """Compressed id of one raw id (e.g. the pad token)."""
        if not 0 <= raw_id < self.vocab_size:
            raise ValueError(f"raw id {raw_id} outside the vocabulary [0, {self.vocab_size})")
        return int(self.lookup[raw_id])

    def compress(self, ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw ids (any shape, numpy/list or torch) -> int64 compressed ids of the same type and device.

        Negative ids are returned unchanged; ids >= vocab_size raise ValueError.
        """
        torch = sys.modules.get("torch")  # a torch tensor implies torch is imported
        if torch is not None and isinstance(ids, torch.Tensor):
            x = ids.long()
            if x.numel() and int(x.max()) >= self.vocab_size:
                raise ValueError(f"token id {int(x.max())} >= vocab_size {self.vocab_size}")
            lut = self._lookup_on(x.device)
            return torch.where(x >= 0, lut[x.clamp(min=0)], x)
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(arr.max())} >= vocab_size {self.vocab_size}")
        return np.where(arr >= 0, self.lookup[np.clip(arr, 0, None)], arr)

    def _lookup_on(self, device: torch.device) -> torch.Tensor:
        import torch

        key = str(device)
        if key not in self._torch_lookup:
            self._torch_lookup[key] = torch.from_numpy(self.lookup).to(device)
        return self._torch_lookup[key]

    def verify(self, tokenizer: Any) -> None:
        """Raise ValueError unless this map was built for `tokenizer` (identity maps: V must suffice)."""
        if self.is_identity:
            n = _vocab_len(tokenizer)
            if n > self.vocab_size:
                raise ValueError(f"identity compression map covers {self.vocab_size} ids, tokenizer has {n}")
            return
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.tokenizer_fingerprint:
            raise ValueError(
                f"compression map built for a different tokenizer: fingerprint {self.tokenizer_fingerprint} "
                f"!= {fp} (map vocab {self.vocab_size}, tokenizer vocab {_vocab_len(tokenizer)})"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .npz file (`lookup` + json `meta`) atomically (temp file, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "compressed_vocab_size": self.compressed_vocab_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, lookup=self.lookup, meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: Any = None) -> CompressionMap:
        """Read a map written by `save`; with `tokenizer`, verify it was built for that tokenizer."""
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            lookup = data["lookup"]
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: not an engram compression map (format {meta.get('format')!r})")
        cmap = cls(
            lookup=lookup,
            compressed_vocab_size=meta["compressed_vocab_size"],
            vocab_size=meta["vocab_size"],
            tokenizer_fingerprint=meta["tokenizer_fingerprint"],
        )
        if tokenizer is not None:
            cmap.verify(tokenizer)
        return cmap


def build_compression_map(tokenizer: Any) -> CompressionMap:
    """Build P for a `tokenizers.Tokenizer`, a `transformers` tokenizer, or any object with
    `decode(ids, skip_special_tokens=False)`, `convert_ids_to_tokens`/`id_to_token` and a length."""
    vocab_size = _vocab_len(tokenizer)
    if vocab_size < 1:
        raise ValueError("tokenizer has an empty vocabulary")
    texts = _decoded_texts(tokenizer, vocab_size)
    tokens = _token_strings(tokenizer, vocab_size)
    normalize = text_normalizer().normalize_str
    key_to_id: dict[str | None, int] = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for raw_id, (text, token) in enumerate(zip(texts, tokens, strict=True)):
        if "\ufffd" in text:
            key = token
        else:
            key = normalize(text) or text
        lookup[raw_id] = key_to_id.setdefault(key, len(key_to_id))
    return CompressionMap(
        lookup=lookup,
        compressed_vocab_size=len(key_to_id),
        vocab_size=vocab_size,
        tokenizer_fingerprint=_fingerprint_of_tokens(tokens),
    )


def identity_compression_map(vocab_size: int) -> CompressionMap:
    """P = identity over `vocab_size` raw ids (the `w/o token compress` ablation, V' = V)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return CompressionMap(
        lookup=np.arange(vocab_size, dtype=np.int64),
        compressed_vocab_size=vocab_size,
        vocab_size=vocab_size,
        tokenizer_fingerprint=f"{_IDENTITY_PREFIX}{vocab_size}",
    )
