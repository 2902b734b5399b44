"""Parameter groups of the backbone optimizer (Engram paper §4.1; docs/model.md rules O1-O4).

Every trainable parameter of the model lands in exactly one group, except the Engram tables, which are
optimised by `RowSparseAdam` and returned by `engram_table_params` instead. Groups (empty ones dropped):

| name               | contents                                                             | wd   | muon |
|--------------------|----------------------------------------------------------------------|------|------|
| `muon`             | (optimizer.name = muon) hidden matrices: attention projections incl. | wd   | yes  |
|                    | MLA factors, dense/shared FFN, routed experts [E, ., .] per expert   |      |      |
| `engram_muon`      | (muon) Engram W_V and W_K projections                                | wd   | yes  |
| `decay`            | other >= 2-D backbone weights: embedding, LM head, router, mHC phi   | wd   | no   |
|                    | (with adamw: also everything that `muon` holds)                      |      |      |
| `no_decay`         | 0-/1-D backbone parameters: RMSNorm weights, biases, mHC bias/alpha  | 0    | no   |
| `engram_decay`     | >= 2-D Engram weights: depthwise conv (with adamw: also W_V, W_K)    | wd   | no   |
| `engram_no_decay`  | Engram biases and norm weights                                       | 0    | no   |

Router and mHC phi stay on AdamW (no paper settles these two 2-D cases; AdamW is the conservative choice,
docs/model.md rule O3), as do embedding and LM head (Moonlight) and the depthwise conv kernel [C, 1, K]
(not a matrix). The MoE router's `expert_bias` is a buffer, not a parameter. Each group carries `name`,
`params`, `lr`, `weight_decay` and `use_muon`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import OptimizerConfig
from ..model.engram import EngramModule
from ..model.hyper_connections import HeadCollapse, HyperConnection
from ..model.moe import GroupedExperts, Router

GROUP_ORDER = ("muon", "engram_muon", "decay", "no_decay", "engram_decay", "engram_no_decay")
_ADAMW_ONLY_OWNERS = (nn.Embedding, Router, HyperConnection, HeadCollapse)


def engram_table_params(model: nn.Module) -> list[nn.Parameter]:
    """The Engram table weights (one per Engram layer), whether or not they are parameters of `model`."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, EngramModule):
            continue
        table = module.table
        if isinstance(table, nn.Module):
            params = list(table.parameters())
        else:
            weight = getattr(table, "weight", None)
            params = [weight] if isinstance(weight, nn.Parameter) else []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(parameter) -> the module that registers it directly."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    return owners


def _is_muon_matrix(p: nn.Parameter, owner: nn.Module, lm_head: nn.Parameter | None) -> bool:
    """A hidden weight matrix for Muon: 2-D linear weights and the per-expert matrices of routed experts."""
    if isinstance(owner, GroupedExperts):
        return p.dim() == 3
    if p is lm_head or isinstance(owner, _ADAMW_ONLY_OWNERS):
        return False
    return p.dim() == 2 and isinstance(owner, nn.Linear)


def param_groups_for(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` (Engram tables excluded) into the groups above."""
    if cfg.name not in ("adamw", "muon"):
        raise ValueError(f"optimizer.name: unknown '{cfg.name}' (expected adamw or muon)")
    use_muon = cfg.name == "muon"
    tables = {id(p) for p in engram_table_params(model)}
    engram_dense = {id(p) for m in model.modules() if isinstance(m, EngramModule)
                    for p in m.parameters()} - tables
    owners = _owners(model)
    lm_head = getattr(getattr(model, "lm_head", None), "weight", None)
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_ORDER}
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in tables:
            continue
        prefix = "engram_" if id(p) in engram_dense else ""
        if p.dim() < 2:
            buckets[prefix + "no_decay"].append(p)
        elif use_muon and _is_muon_matrix(p, owners[id(p)], lm_head):
            buckets[prefix + "muon"].append(p)
        else:
            buckets[prefix + "decay"].append(p)
    groups = []
    for name in GROUP_ORDER:
        if buckets[name]:
            wd = 0.0 if name.endswith("no_decay") else cfg.weight_decay
            groups.append({"name": name, "params": buckets[name], "lr": cfg.lr, "weight_decay": wd,
                           "use_muon": name.endswith("muon")})
    return groups


def group_sizes(groups: list[dict[str, Any]]) -> dict[str, int]:
    """name -> number of elements, for logging the grouping."""
    return {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
