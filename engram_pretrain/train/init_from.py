"""`checkpoint.init_from`: start a fresh run from another model's weights (continued pretraining).

The source is an exported Hugging Face folder (`engram-pretrain export`) or a training checkpoint (a
`step_<N>/`, checkpoint or run directory). Its full state dict (backbone, MoE router biases, whole Engram
tables) is loaded into this rank's model *before* DeepSpeed wraps it, so any ZeRO stage builds its master
weights and partitions from the loaded values; routed experts are cut to this rank's expert-parallel slice
and tables to its row range. Optimizer state, step counter and data position start fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError, RunConfig, config_diff, from_dict, read_yaml_tree
from ..model.config import ModelConfig
from .checkpoint import checkpoint_state_dict, resolve_checkpoint

if TYPE_CHECKING:
    from ..model.transformer import EngramMoEModel
    from ..parallel.expert_parallel import ExpertParallel
    from .engine import TableStore

logger = logging.getLogger(__name__)

KEY = "checkpoint.init_from"
TABLE_SUFFIX = ".engram.table.weight"


def read_source(source: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full fp32 state dict with tables and router biases) of a Hugging Face folder written by
    the exporter or of a training checkpoint."""
    path = Path(source)
    if (path / "config.json").is_file():
        from ..export.importer import import_hf

        cfg, state, _ = import_hf(path)
        return cfg, state
    step = resolve_checkpoint(path)
    if step is None:
        raise ConfigError(f"{KEY}: {source} is neither an exported Hugging Face folder (config.json) nor a "
                          "complete training checkpoint, checkpoint directory or run directory holding one")
    cfg = from_dict(ModelConfig, read_yaml_tree(step / "config.yaml").get("model", {}), "model.")
    return cfg, checkpoint_state_dict(step)


def load_initial_weights(cfg: RunConfig, model: EngramMoEModel, store: TableStore,
                         expert_parallel: ExpertParallel | None, source: str | Path) -> None:
    """Copy the weights of `source` into `model` (this rank's experts) and `store` (this rank's table rows).

    Raises ConfigError naming `checkpoint.init_from` when the source does not fit the run's model: other
    parameter names or shapes, or another Engram addressing (tokenizer compression map, hashing settings:
    the tables' rows would mean different n-grams). Model settings that change no tensor (e.g. the aux-loss
    weight) may differ; they are logged."""
    source_cfg, state = read_source(source)
    changed = config_diff(source_cfg, cfg.model)
    if changed:
        logger.warning("%s: model settings differ from %s: %s", KEY, source,
                       ", ".join(f"model.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    tables = {int(name.split(".")[1]): state.pop(name) for name in list(state) if name.endswith(TABLE_SUFFIX)}
    if expert_parallel is not None:
        try:
            state = expert_parallel.local_expert_state(model, state)
        except ValueError as err:
            raise ConfigError(f"{KEY}: the weights of {source} do not fit this run's model: {err}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{n} {tuple(state[n].shape)} vs {tuple(own[n].shape)}" for n in own
              if n in state and state[n].shape != own[n].shape]
    shapes += [f"layer {layer} table {tuple(full.shape)} vs ({store.table(layer).num_rows}, "
               f"{store.weight(layer).shape[1]})" for layer, full in sorted(tables.items())
               if layer in store.layers()
               and tuple(full.shape) != (store.table(layer).num_rows, store.weight(layer).shape[1])]
    if sorted(tables) != store.layers():
        missing.append(f"Engram tables at layers {store.layers()} (source: {sorted(tables)})")
    if missing or unexpected or shapes:
        raise ConfigError(f"{KEY}: the weights of {source} do not fit this run's model: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}, "
                          f"shapes (source vs run) {shapes[:4]}")
    for name, value in own.items():
        if name.startswith("addresser.") and not torch.equal(value.cpu(), state[name]):
            raise ConfigError(f"{KEY}: {source} addresses its Engram tables differently ({name} differs): "
                              "another tokenizer compression map or Engram hashing settings")
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        for layer, full in tables.items():
            weight = store.weight(layer)
            start, end = store.row_range(layer)
            weight.copy_(full[start:end].to(weight.dtype))
