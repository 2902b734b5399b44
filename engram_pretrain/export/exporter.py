"""Write a self-contained Hugging Face folder for an Engram MoE model.

Layout of `out_dir`:

    config.json                    EngramMoEConfig: model_type "engram_moe", auto_map, model config, hashing
    generation_config.json         bos/eos/pad ids of the tokenizer (greedy by default)
    model.safetensors              weights, or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    hf_config.py                   remote code: the config class
    modeling_engram_moe.py         remote code: PreTrainedModel + GenerationMixin wrapper (imports rewritten)
    addressing.py attention.py ... remote code: the torch-only model package, flat
    tokenizer.json, tokenizer_config.json, ...   copied from the tokenizer folder
    engram_compression_map.npz     the tokenizer compression map (CompressionMap.save format)
    engram_hashing.json            hash parameters (multipliers, prime sizes, pad ids, seed)

Weights are our state-dict names prefixed with `model.`. They are written shard by shard from an iterator
of (name, tensor): at most one shard of tensors is held at a time, so a checkpoint converter can stream
tensors it loads one by one (`export_tensors`). The folder is built under a temporary name and renamed
at the end: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from .. import model as model_package
from ..memory.compression import CompressionMap
from ..model.addressing import EngramAddresser, EngramAddressing
from ..model.config import ModelConfig
from ..model.transformer import EngramMoEModel
from . import hf_config, modeling_engram_moe
from .modeling_engram_moe import addressing_to_dict, model_config_to_dict

WEIGHT_PREFIX = "model."
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
COMPRESSION_FILE = "engram_compression_map.npz"
HASHING_FILE = "engram_hashing.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
AUTO_MAP = {"AutoConfig": "hf_config.EngramMoEConfig",
            "AutoModelForCausalLM": "modeling_engram_moe.EngramMoEForCausalLM"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or a string like "2GB" (decimal) / "500MiB" (binary)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else ""
        if match is None or (unit or "B") not in _UNITS:
            raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. '2GB', '500MiB', 1000000)")
        value = int(float(match.group(1)) * _UNITS[unit or "B"])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


class ShardedSafetensorsWriter:
    """Writes (name, tensor) pairs into safetensors shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own), then names them like `transformers` and writes the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} given twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.out_dir / f".shard-{index}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, rename the shards, write the index (several shards); return file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [SAFE_WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.out_dir / f".shard-{i}.safetensors", self.out_dir / name)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def expected_tensors(cfg: ModelConfig, addressing: EngramAddressing | None) -> dict[str, torch.Tensor]:
    """Meta tensors (names, shapes, dtypes) of the persistent state of `EngramMoEModel(cfg, addressing)`."""
    with torch.device("meta"):
        meta = EngramMoEModel(cfg, addressing)
    return dict(meta.state_dict())


def _addresser_state(addressing: EngramAddressing | None, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if addressing is None:
        return {}
    addresser = EngramAddresser(addressing, cfg.engram.max_ngram, cfg.engram.num_heads)
    return {f"addresser.{k}": v for k, v in addresser.state_dict().items()}


def _checked_tensors(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig,
                     addressing: EngramAddressing | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate names/shapes/dtypes against the model; fill in (or check) the addresser buffers from
    `addressing`; drop the tied LM head."""
    expected = expected_tensors(cfg, addressing)
    addresser = _addresser_state(addressing, cfg)
    seen: set[str] = set()
    for name, tensor in tensors:
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied to embed.weight: not stored (transformers re-ties it)
        want = expected.get(name)
        if want is None:
            raise ValueError(f"tensor {name!r} is not part of the model (expected names like "
                             f"{sorted(expected)[:3]} ...)")
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)} != model's {tuple(want.shape)}")
        if tensor.dtype.is_floating_point != want.dtype.is_floating_point or (
                not want.dtype.is_floating_point and tensor.dtype != want.dtype):
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} does not fit the model's {want.dtype}")
        if name in addresser and not torch.equal(tensor.cpu(), addresser[name]):
            raise ValueError(f"tensor {name!r} disagrees with the given EngramAddressing")
        seen.add(name)
        yield name, tensor
    for name, tensor in addresser.items():
        if name not in seen:
            seen.add(name)
            yield name, tensor
    missing = sorted(set(expected) - seen - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise ValueError(f"{len(missing)} model tensors were not given, e.g. {missing[:5]}")


def write_remote_code(out_dir: Path) -> list[str]:
    """Copy the torch-only model package (flat) and the two HF files, rewriting `..model.` imports."""
    written = []
    model_dir = Path(model_package.__file__).parent
    sources = [p for p in sorted(model_dir.glob("*.py")) if p.name != "__init__.py"]
    sources += [Path(hf_config.__file__), Path(modeling_engram_moe.__file__)]
    for src in sources:
        text = src.read_text()
        text = re.sub(r"^(\s*)from \.\.model\.(\w+) import", r"\1from .\2 import", text, flags=re.MULTILINE)
        if re.search(r"^\s*(from \.\.|import \.\.)", text, flags=re.MULTILINE):
            raise AssertionError(f"{src.name}: imports outside the model package cannot ship as remote code")
        if re.search(r"^\s*(from|import) engram_pretrain\b", text, flags=re.MULTILINE):
            raise AssertionError(f"{src.name}: imports engram_pretrain, which an export cannot rely on")
        (out_dir / src.name).write_text(text)
        written.append(src.name)
    # transformers 5.0 copies only the modeling file's direct relative imports out of a local folder
    direct = set(re.findall(r"^from \.(\w+) import", (out_dir / "modeling_engram_moe.py").read_text(),
                            flags=re.MULTILINE))
    if missing := sorted({Path(n).stem for n in written} - direct - {"modeling_engram_moe"}):
        raise AssertionError(f"modeling_engram_moe.py must import {missing} directly (transformers 5.0 "
                             f"copies only its direct relative imports)")
    return written


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    if not tokenizer_dir.is_dir():
        raise ValueError(f"tokenizer_dir {tokenizer_dir} is not a directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
            copied.append(name)
    if "tokenizer_config.json" not in copied or not {"tokenizer.json", "tokenizer.model", "vocab.json",
                                                       "vocab.txt"} & set(copied):
        raise ValueError(f"{tokenizer_dir} holds no transformers tokenizer (need tokenizer_config.json and "
                         f"tokenizer.json / tokenizer.model / vocab files; save it with save_pretrained)")
    return copied


def _check_compression(path: Path, addressing: EngramAddressing, tokenizer_dir: Path) -> CompressionMap:
    """Load the map, verify it against the tokenizer and the addressing's lookup."""
    if not path.is_file():
        raise ValueError(f"compression map {path} does not exist")
    cmap = CompressionMap.load(path)
    if (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        cmap.verify(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    lookup = addressing.compression_lookup
    if lookup is not None:
        if cmap.compressed_vocab_size != addressing.compressed_vocab_size or \
                [int(v) for v in cmap.lookup] != list(lookup[:cmap.vocab_size]):
            raise ValueError(f"compression map {path} differs from the model's Engram addressing "
                             f"(V'={cmap.compressed_vocab_size} vs {addressing.compressed_vocab_size})")
    return cmap


def _generation_config(tokenizer_dir: Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    gen: dict[str, Any] = {"do_sample": False}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, key, None)
        if value is not None:
            gen[key] = int(value)
    if "pad_token_id" not in gen and "eos_token_id" in gen:
        gen["pad_token_id"] = gen["eos_token_id"]
    gen.update(overrides or {})
    return gen


def export_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: ModelConfig,
    addressing: EngramAddressing | None,
    tokenizer_dir: str | os.PathLike,
    compression_map_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "2GB",
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write the HF folder from a stream of (state-dict name, tensor) of `EngramMoEModel(config, addressing)`.

    Names are our model's state-dict names (no prefix). Every model tensor must come exactly once (the
    addresser buffers may be omitted: they are rebuilt from `addressing`; a tied LM head is skipped).
    `compression_map_path` is required when the addressing compresses token ids. `generation` overrides
    fields of generation_config.json. Returns `out_dir`.
    """
    config.validate()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; choose a new folder")
    if bool(config.engram.layers) != (addressing is not None):
        raise ValueError("addressing must be given exactly when the model has Engram layers")
    tokenizer_dir = Path(tokenizer_dir)
    shard_bytes = parse_size(max_shard_size)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _copy_tokenizer(tokenizer_dir, tmp)
        gen = _generation_config(tokenizer_dir, generation)
        hashing: dict[str, Any] = {}
        if addressing is not None:
            if compression_map_path is not None:
                cmap = _check_compression(Path(compression_map_path), addressing, tokenizer_dir)
                cmap.save(tmp / COMPRESSION_FILE)
            elif addressing.compression_lookup is not None:
                raise ValueError("the model hashes compressed ids: pass compression_map_path")
            e = config.engram
            hashing = {"max_ngram": e.max_ngram, "num_heads": e.num_heads, "seed": e.seed,
                       "base_table_size": config.engram_base_sizes(), "raw_pad_token_id": e.pad_token_id,
                       "layers": list(e.layers), **addressing_to_dict(addressing)}
            (tmp / HASHING_FILE).write_text(json.dumps(hashing, indent=2) + "\n")
        writer = ShardedSafetensorsWriter(tmp, shard_bytes)
        dtype = None
        for name, tensor in _checked_tensors(tensors, config, addressing):
            if dtype is None and tensor.dtype.is_floating_point:
                dtype = tensor.dtype
            writer.add(WEIGHT_PREFIX + name, tensor)
        writer.close()
        write_remote_code(tmp)
        hf_cfg = hf_config.EngramMoEConfig(
            model_config=model_config_to_dict(config),
            engram_addressing=addressing_to_dict(addressing) if addressing is not None else None,
            bos_token_id=gen.get("bos_token_id"), eos_token_id=gen.get("eos_token_id"),
            pad_token_id=gen.get("pad_token_id"), dtype=str(dtype or torch.float32).removeprefix("torch."))
        hf_cfg.architectures = ["EngramMoEForCausalLM"]
        hf_cfg.auto_map = dict(AUTO_MAP)
        hf_cfg.save_pretrained(str(tmp))
        GenerationConfig(**gen).save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def addressing_of(model: EngramMoEModel) -> EngramAddressing | None:
    """The EngramAddressing held in a model's addresser buffers (None without Engram layers)."""
    a = model.addresser
    if a is None:
        return None
    return EngramAddressing(
        layer_multipliers={layer: getattr(a, f"multipliers_{layer}").tolist() for layer in a.layers},
        layer_head_sizes={layer: a.head_sizes(layer) for layer in a.layers},
        compression_lookup=a.compression.tolist() if a.compress_ids else None,
        compressed_vocab_size=a.compressed_vocab_size, pad_id=a.pad_id)


def model_tensors(model: EngramMoEModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's persistent state, without copies."""
    yield from model.state_dict().items()


def export_model(
    model: EngramMoEModel,
    addressing: EngramAddressing | None,
    tokenizer_dir: str | os.PathLike,
    compression_map_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "2GB",
    generation: dict[str, Any] | None = None,
) -> Path:
    """Export an in-memory (single-process, local-table) model; see `export_tensors`.

    `addressing` None takes it from the model's addresser buffers.
    """
    if addressing is None:
        addressing = addressing_of(model)
    return export_tensors(model_tensors(model), model.config, addressing, tokenizer_dir, compression_map_path,
                          out_dir, max_shard_size, generation)
