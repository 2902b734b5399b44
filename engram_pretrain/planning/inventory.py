"""What the planner counts, read off the model built on the meta device (no memory): the backbone
optimizer's parameter groups as DeepSpeed flattens them, each split into dense and routed-expert
parameters, and the Engram table rows per layer (the same prime search the model uses,
`memory.reference_hash.table_primes`). Parameter totals are `analysis.params.count_parameters`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field

import torch

from ..analysis.params import ParamCounts, count_parameters
from ..config import OptimizerConfig
from ..memory.addressing_builder import build_addressing
from ..model.config import ModelConfig
from ..model.moe import GroupedExperts
from ..model.transformer import EngramMoEModel
from ..train.param_groups import param_groups_for


@dataclass(frozen=True)
class GroupShape:
    """One backbone optimizer group: per-parameter element counts, dense and routed-expert (all E experts)."""

    name: str
    dense: tuple[int, ...]
    expert: tuple[int, ...]


@dataclass(frozen=True)
class ModelInventory:
    """The counts the planner needs of one model config."""

    counts: ParamCounts
    groups: tuple[GroupShape, ...]
    table_rows: tuple[int, ...]
    """Rows of each Engram layer's table (all heads of the layer)."""
    table_dim: int
    """Width of a table row (d_mem / ((max_ngram - 1) * num_heads))."""
    block_params: tuple[int, ...] = field(default=())
    """Backbone parameters of each block (all experts; tables excluded): what ZeRO-3 gathers per block."""

    @property
    def dense_params(self) -> int:
        return sum(sum(g.dense) for g in self.groups)

    @property
    def expert_params(self) -> int:
        return sum(sum(g.expert) for g in self.groups)


def model_inventory(model: ModelConfig, optimizer: OptimizerConfig) -> ModelInventory:
    """The inventory of `model` with the backbone groups of `optimizer` (cached per config)."""
    key = json.dumps({"model": asdict(model), "optimizer": optimizer.name}, sort_keys=True)
    return _inventory(key)


@functools.lru_cache(maxsize=32)
def _inventory(key: str) -> ModelInventory:
    tree = json.loads(key)
    from ..config import from_dict

    model_cfg: ModelConfig = from_dict(ModelConfig, tree["model"])
    opt_cfg = OptimizerConfig(name=tree["optimizer"])
    e = model_cfg.engram
    with torch.device("meta"):
        model = EngramMoEModel(model_cfg, build_addressing(model_cfg, None) if e.layers else None)
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    groups = []
    for g in param_groups_for(model, opt_cfg):
        dense = tuple(p.numel() for p in g["params"] if id(p) not in experts)
        expert = tuple(p.numel() for p in g["params"] if id(p) in experts)
        groups.append(GroupShape(g["name"], dense, expert))
    rows: list[int] = []
    dim = 0
    block_params = []
    for block in model.blocks:
        table_ids = set()
        if block.engram is not None:
            weight = block.engram.table.weight
            rows.append(int(weight.shape[0]))
            dim = int(weight.shape[1])
            table_ids.add(id(weight))
        block_params.append(sum(p.numel() for p in block.parameters() if id(p) not in table_ids))
    return ModelInventory(counts=count_parameters(model_cfg), groups=tuple(groups), table_rows=tuple(rows),
                          table_dim=dim, block_params=tuple(block_params))
