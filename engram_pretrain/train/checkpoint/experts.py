"""Routed experts in checkpoints under expert parallelism: `experts/ep_rank_<r>.pt` (this EP rank's experts,
fp32 master weights, with their global expert range) and `experts/meta.json` (ep_size, expert count, the
weight names). DeepSpeed's own files hold the ZeRO partitions; these restore the module weights it cannot
place per EP rank, and let consolidation concatenate every expert in order."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from ...model.transformer import EngramMoEModel
    from ...parallel.expert_parallel import ExpertParallel

EXPERTS_DIR = "experts"
"""Checkpoint subdirectory with the expert shards (`ep_rank_<r>.pt`) and `meta.json`."""
EXPERT_META = "meta.json"


def save_experts(ep: ExpertParallel, model: EngramMoEModel, directory: str | Path) -> None:
    """Write `<directory>/experts/ep_rank_<r>.pt` (fp32 master weights of this EP rank's experts, written
    by expert-data-parallel rank 0) and `meta.json` (global rank 0). Collective over the world."""
    from deepspeed.utils import safe_get_full_fp32_param

    root = Path(directory) / EXPERTS_DIR
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    shard: dict[str, Any] = {"ep_size": ep.ep_size, "ep_rank": ep.groups.ep_rank, "weights": {}}
    for name, p in ep.expert_params(model):
        full = safe_get_full_fp32_param(p)  # ZeRO 1/2: gathered over the expert-DP group (collective)
        shard["weights"][name] = (p.data if full is None else full).detach().float().cpu().clone()
    experts = model.moe_layers()[0].experts
    shard["expert_range"] = [experts.expert_offset, experts.expert_offset + experts.num_experts]
    if ep.groups.edp_rank == 0:
        torch.save(shard, root / f"ep_rank_{ep.groups.ep_rank:05d}.pt")
    if dist.get_rank() == 0:
        meta = {"ep_size": ep.ep_size, "num_experts": experts.num_global_experts,
                "weights": [n for n, _ in ep.expert_params(model)]}
        (root / EXPERT_META).write_text(json.dumps(meta, indent=1) + "\n")


def load_experts(ep: ExpertParallel, model: EngramMoEModel, directory: str | Path) -> None:
    """Copy this EP rank's expert weights back from `save`'s file (after DeepSpeed's own load, which
    restores the ZeRO partitions but fills every rank's module experts from rank 0's model file)."""
    check_expert_checkpoint(directory, ep.ep_size)
    path = Path(directory) / EXPERTS_DIR / f"ep_rank_{ep.groups.ep_rank:05d}.pt"
    shard = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p in ep.expert_params(model):
            if name not in shard["weights"] or shard["weights"][name].shape != p.shape:
                raise ValueError(f"{path}: no expert weight {name} of shape {tuple(p.shape)}")
            p.data.copy_(shard["weights"][name].to(p.device))


def module_loader_without_experts(ep: ExpertParallel, model: EngramMoEModel
                                   ) -> Callable[..., None]:
    """DeepSpeed `custom_load_fn` for its module file under expert parallelism: loads every entry but the
    routed expert weights (strict otherwise), which `load_experts` fills per EP rank afterwards.

    The module file is rank 0's state dict, so it holds EP rank 0's experts; with an uneven placement
    (docs/expert_parallel.md) another EP rank's expert tensors have fewer rows and a strict load of them
    would fail on the shapes."""
    expert_names = {name for name, _ in ep.expert_params(model)}

    def load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
        result = dst.load_state_dict({k: v for k, v in src.items() if k not in expert_names}, strict=False)
        missing = sorted(set(result.missing_keys) - expert_names)
        if missing or result.unexpected_keys:
            raise ValueError(f"DeepSpeed module file does not fit the model: missing {missing[:4]}, "
                             f"unexpected {list(result.unexpected_keys)[:4]}")

    return load


def read_expert_meta(directory: str | Path) -> dict[str, Any] | None:
    """`experts/meta.json` of a checkpoint (ep_size, num_experts, weight names); None without shards."""
    meta = Path(directory) / EXPERTS_DIR / EXPERT_META
    return json.loads(meta.read_text()) if meta.is_file() else None


def read_expert_weights(step_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """Every routed expert weight of an expert-parallel checkpoint, the EP ranks' shards concatenated in
    expert order; None when the checkpoint has no expert shards."""
    meta = read_expert_meta(step_dir)
    if meta is None:
        return None
    root = Path(step_dir) / EXPERTS_DIR
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in sorted(root.glob("ep_rank_*.pt"))]
    shards.sort(key=lambda sh: sh["expert_range"][0])
    ranges = [tuple(sh["expert_range"]) for sh in shards]
    if not ranges:
        raise ValueError(f"{root}: meta.json but no ep_rank_*.pt expert shards")
    # checkpoints written before uneven placement split evenly and did not record the count
    total = meta.get("num_experts", int(meta["ep_size"]) * (ranges[0][1] - ranges[0][0]))
    if [r[0] for r in ranges] != [0] + [r[1] for r in ranges[:-1]] or ranges[-1][1] != total:
        raise ValueError(f"{root}: the expert shards {ranges} do not cover the {total} "
                         "routed experts in contiguous ranges (a shard missing?)")
    return {name: torch.cat([sh["weights"][name] for sh in shards]) for name in meta["weights"]}


def checkpoint_ep_size(directory: str | Path) -> int:
    """The expert-parallel size a checkpoint was written with (1 when it has no expert shards)."""
    meta = read_expert_meta(directory)
    return 1 if meta is None else int(meta["ep_size"])


def check_expert_checkpoint(directory: str | Path, ep_size: int) -> None:
    """ValueError unless the checkpoint was written with this `parallel.ep_size` (experts and their
    optimizer state are not resharded to another expert-parallel size)."""
    saved = checkpoint_ep_size(directory)
    if saved != ep_size:
        raise ValueError(f"{directory} was written with parallel.ep_size={saved}; resuming with "
                         f"parallel.ep_size={ep_size} is not supported (the experts and their optimizer "
                         "state are sharded by EP rank); relaunch with the original parallel.ep_size")
