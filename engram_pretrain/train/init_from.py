"""`checkpoint.init_from`: start a fresh run from another model's weights (continued pretraining).

The source is an exported Hugging Face folder (`engram-pretrain export`) or a training checkpoint (a
`step_<N>/`, checkpoint or run directory). Its weights (backbone, MoE router biases, Engram tables) are
loaded into this rank's model *before* DeepSpeed wraps it, so any ZeRO stage builds its master weights and
partitions from the loaded values; each rank takes its expert-parallel slice of the routed experts and its
row range of every table (from an export, reading only those rows). Optimizer state, step counter and data
position start fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig, config_diff, from_dict, read_yaml_tree
from ..export.importer import ExportedTensors, read_hf_config
from ..model.config import ModelConfig
from ..model.transformer import TABLE_SUFFIX
from .checkpoint import checkpoint_state_dict, resolve_checkpoint

if TYPE_CHECKING:
    from ..memory.table_store import TableStore
    from ..model.transformer import EngramMoEModel
    from ..parallel.expert_parallel import ExpertParallel

logger = logging.getLogger(__name__)

KEY = "checkpoint.init_from"


class _InMemory:
    """The `ExportedTensors` interface over a state dict (training-checkpoint sources)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        return self.state[name][start:end]


def read_source(source: str | Path) -> tuple[ModelConfig, ExportedTensors | _InMemory]:
    """(model config, tensor access) of a Hugging Face folder written by the exporter (lazy: tensors and row
    ranges are read on demand) or of a training checkpoint (consolidated in memory: ZeRO partitions, expert
    shards, table ranges, router biases)."""
    path = Path(source)
    try:
        if (path / "config.json").is_file():
            cfg, _ = read_hf_config(path)
            return cfg, ExportedTensors(path)
        step = resolve_checkpoint(path)
        if step is None:
            raise ValueError(f"{source} is neither an exported Hugging Face folder (config.json) nor a "
                             "complete training checkpoint, checkpoint directory or run directory with one")
        cfg = from_dict(ModelConfig, read_yaml_tree(step / "config.yaml").get("model", {}), "model.")
        return cfg, _InMemory(checkpoint_state_dict(step))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{KEY}: {err}") from None


def load_initial_weights(cfg: RunConfig, model: EngramMoEModel, store: TableStore,
                         expert_parallel: ExpertParallel | None, source: str | Path) -> None:
    """Copy the weights of `source` into `model` (this rank's routed experts) and `store` (this rank's table
    rows); from an export, only those rows are read.

    Raises ConfigError naming `checkpoint.init_from` when the source does not fit the run's model: other
    parameter names or shapes, or another Engram addressing (tokenizer compression map, hashing settings:
    the tables' rows would mean different n-grams). Model settings that change no tensor (e.g. the aux-loss
    weight) may differ; they are logged."""
    source_cfg, src = read_source(source)
    if cfg.model.tie_embeddings and not source_cfg.tie_embeddings:
        raise ConfigError(f"{KEY}: {source} has separate embedding and LM head weights; this run ties them "
                          "(model.tie_embeddings=true): one of the two would be lost")
    changed = config_diff(source_cfg, cfg.model)
    if changed and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning("%s: model settings differ from %s: %s", KEY, source,
                       ", ".join(f"model.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    names = set(src.names())
    tied = source_cfg.tie_embeddings and "lm_head.weight" not in names  # exports store a tied head once
    alias = {"lm_head.weight": "embed.weight"} if tied else {}
    tables = {int(name.split(".")[1]): name for name in names if name.endswith(TABLE_SUFFIX)}
    available = (names - set(tables.values())) | set(alias)
    experts, lo, hi, num_experts = ([], 0, 0, 0) if expert_parallel is None else \
        expert_parallel.local_expert_range(model)
    own = model.state_dict()

    def source_shape(name: str) -> tuple[int, ...]:
        return src.shape(alias.get(name, name))

    def run_shape(name: str) -> tuple[int, ...]:  # as a whole model holds it
        shape = tuple(own[name].shape)
        return (num_experts, *shape[1:]) if name in experts else shape

    missing, unexpected = sorted(set(own) - available), sorted(available - set(own))
    shapes = []
    for name in own:  # each source shape read once (an export opens its file per read)
        have = source_shape(name) if name in available else None
        if have is not None and have != run_shape(name):
            shapes.append(f"{name} {have} vs {run_shape(name)}")
    for layer in sorted(set(tables) & set(store.layers())):
        want, have = (store.table(layer).num_rows, store.weight(layer).shape[1]), src.shape(tables[layer])
        if have != want:
            shapes.append(f"layer {layer} table {have} vs {want}")
    if set(store.layers()) - set(tables):
        missing.insert(0, f"Engram tables at layers {sorted(set(store.layers()) - set(tables))}")
    if set(tables) - set(store.layers()):
        unexpected.insert(0, f"Engram tables at layers {sorted(set(tables) - set(store.layers()))}")
    if missing or unexpected or shapes:
        raise ConfigError(f"{KEY}: the weights of {source} do not fit this run's model: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}, "
                          f"shapes (source vs run) {shapes[:4]}")
    for name, value in own.items():
        if name.startswith("addresser.") and not torch.equal(value.cpu(), src.get(name)):
            raise ConfigError(f"{KEY}: {source} addresses its Engram tables differently ({name} differs): "
                              "another tokenizer compression map or Engram hashing settings")
    with torch.no_grad():  # one tensor at a time: never a second copy of the model in memory
        for name, value in own.items():
            value.copy_(src.get(alias.get(name, name), *((lo, hi) if name in experts else ())))
        for layer, name in tables.items():
            weight = store.weight(layer)
            start, end = store.row_range(layer)
            weight.copy_(src.get(name, start, end).to(weight.dtype))
