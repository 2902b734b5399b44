"""Read a folder written by the exporter back into training-side objects (for continued pretraining).

`import_hf(folder)` returns the `ModelConfig`, our model's state dict (names without the `model.` prefix,
tied LM head restored) and the `EngramAddressing` (compression lookup from the weights, checked against
`engram_compression_map.npz`). `EngramMoEModel(config, addressing).load_state_dict(state_dict)` rebuilds
the model; the training side turns it into a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..memory.compression import CompressionMap
from ..model.addressing import EngramAddressing
from ..model.config import ModelConfig
from ..model.transformer import EngramMoEModel
from .exporter import COMPRESSION_FILE, SAFE_INDEX, SAFE_WEIGHTS, WEIGHT_PREFIX, expected_tensors
from .modeling_engram_moe import addressing_from_dict, check_export_folder, model_config_from_dict


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SAFE_INDEX).is_file():
        index = json.loads((folder / SAFE_INDEX).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / SAFE_WEIGHTS).is_file():
        return [folder / SAFE_WEIGHTS]
    raise ValueError(f"{folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX}")


class ExportedTensors:
    """Lazy access to the tensors of an export (names without the `model.` prefix; the tied LM head is not
    listed). `get(name, start, end)` reads only rows [start, end) of one tensor from its memory-mapped
    safetensors file: a rank loading an export reads just its experts and table rows."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._file: dict[str, Path] = {}
        for path in _weight_files(self.folder):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if not key.startswith(WEIGHT_PREFIX):
                        raise ValueError(f"{path.name}: tensor {key!r} lacks the {WEIGHT_PREFIX!r} prefix")
                    self._file[key[len(WEIGHT_PREFIX):]] = path

    def names(self) -> list[str]:
        return list(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self._file[name]), framework="pt") as f:
            return tuple(f.get_slice(WEIGHT_PREFIX + name).get_shape())

    def get(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """The tensor `name`, or its rows [start, end)."""
        with safe_open(str(self._file[name]), framework="pt") as f:
            if start is None and end is None:
                return f.get_tensor(WEIGHT_PREFIX + name)
            return f.get_slice(WEIGHT_PREFIX + name)[start:end]


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an export, names without the `model.` prefix (the tied LM head is not restored)."""
    tensors = ExportedTensors(folder)
    return {name: tensors.get(name) for name in tensors.names()}


def read_hf_config(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(our model config, the whole config.json) of an exported folder, without reading any weights."""
    folder = Path(folder)
    check_export_folder(folder)
    hf = json.loads((folder / "config.json").read_text())
    return model_config_from_dict(hf["model_config"]), hf


def import_hf(
    folder: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, torch.Tensor], EngramAddressing | None]:
    """(model config, state dict, addressing) of an exported folder; raises ValueError if inconsistent."""
    folder = Path(folder)
    cfg, hf = read_hf_config(folder)
    state = read_state_dict(folder)
    if cfg.tie_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    addressing = None
    if cfg.engram.layers:
        data = hf.get("engram_addressing")
        if data is None:
            raise ValueError(f"{folder}/config.json: Engram layers without engram_addressing")
        lookup = None
        if data["token_compression"]:
            if "addresser.compression" not in state:
                raise ValueError(f"{folder}: weights lack model.addresser.compression")
            lookup = [int(v) for v in state["addresser.compression"].tolist()]
            if (folder / COMPRESSION_FILE).is_file():
                cmap = CompressionMap.load(folder / COMPRESSION_FILE)
                if [int(v) for v in cmap.lookup] != lookup[:cmap.vocab_size]:
                    raise ValueError(f"{folder}: {COMPRESSION_FILE} disagrees with the weights' lookup")
        addressing = addressing_from_dict(data, lookup)
    expected = expected_tensors(cfg, addressing)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise ValueError(f"{folder}: {name} has shape {tuple(state[name].shape)}, "
                             f"config implies {tuple(want.shape)}")
    return cfg, state, addressing


def load_model(folder: str | os.PathLike) -> EngramMoEModel:
    """Our torch model with the exported weights (local Engram tables)."""
    cfg, state, addressing = import_hf(folder)
    model = EngramMoEModel(cfg, addressing)
    model.load_state_dict(state)
    return model
