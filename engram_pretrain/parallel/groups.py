"""Expert-parallel process groups: world = data parallel (DP) x expert parallel (EP).

The layout is DeepSpeed's (`deepspeed.utils.groups._create_expert_and_data_parallel`, "E + D" order), so
that DeepSpeed's MoE gradient reduction and our token all-to-all use the same groups:

- **expert-parallel group**: `ep_size` consecutive ranks. The routed experts of every MoE layer are split
  over it in contiguous ranges (`expert_bounds`: with q, m = divmod(E, ep) the first m EP ranks hold q + 1
  experts, the others q, so ep need not divide E; docs/expert_parallel.md, 'Uneven placement'); tokens
  travel inside it by all-to-all.
- **expert-data-parallel group**: the `world / ep_size` ranks with the same EP rank (strided). They hold
  the same experts; expert gradients are averaged over it (and only over it).
- dense (non-expert) parameters: the whole world, as without EP.

Example, world 8, ep_size 2: EP groups [0,1] [2,3] [4,5] [6,7]; expert-DP groups [0,2,4,6] [1,3,5,7].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


def expert_parallel_ranks(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(expert-parallel groups, expert-data-parallel groups) as rank lists, in creation order."""
    if ep_size < 1 or world_size % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the world size {world_size}")
    ep_groups = [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]
    edp_groups = [list(range(i, world_size, ep_size)) for i in range(ep_size)]
    return ep_groups, edp_groups


def expert_counts(num_experts: int, ep_size: int) -> list[int]:
    """Routed experts held by each EP rank: q + 1 on the first m ranks, q on the others (q, m = divmod(E,
    ep)), like the row ranges of sharded tables. ValueError when some rank would hold none (ep > E)."""
    if ep_size < 1 or num_experts < ep_size:
        raise ValueError(f"{num_experts} routed experts cannot be placed on an expert-parallel group of "
                         f"{ep_size} ranks: every EP rank needs at least one expert")
    q, m = divmod(num_experts, ep_size)
    return [q + 1 if r < m else q for r in range(ep_size)]


def expert_bounds(num_experts: int, ep_size: int) -> list[int]:
    """[ep_size + 1] boundaries: EP rank r holds the global experts [bounds[r], bounds[r + 1])."""
    bounds = [0]
    for count in expert_counts(num_experts, ep_size):
        bounds.append(bounds[-1] + count)
    return bounds


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the groups of one EP size (also the `group_name` of expert parameters)."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's expert-parallel and expert-data-parallel groups."""

    ep_size: int
    ep_rank: int
    ep_group: Any
    """torch.distributed ProcessGroup of the EP group (token all-to-all)."""
    edp_size: int
    edp_rank: int
    edp_group: Any
    """ProcessGroup of the expert-data-parallel group (expert gradient reduction)."""

    @property
    def name(self) -> str:
        return group_name(self.ep_size)


def new_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the groups with `torch.distributed.new_group` (collective: every rank calls it, same order).

    For runs without DeepSpeed (tests, inference); the trainer uses `deepspeed_expert_parallel_groups`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_groups, edp_groups = expert_parallel_ranks(world, ep_size)
    mine: dict[str, Any] = {}
    for kind, rank_lists in (("edp", edp_groups), ("ep", ep_groups)):  # DeepSpeed's order: EDP first
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return ExpertParallelGroups(ep_size=ep_size, ep_rank=rank % ep_size, ep_group=mine["ep"],
                                edp_size=world // ep_size, edp_rank=rank // ep_size, edp_group=mine["edp"])


def deepspeed_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create (or reuse) DeepSpeed's expert groups for `ep_size` and return them (collective).

    Registering them in `deepspeed.utils.groups` is what lets the DeepSpeed engine reduce expert gradients
    over the expert-data-parallel group of `param.group_name`. Needs torch.distributed initialised."""
    import deepspeed.comm as ds_dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import groups as ds_groups

    # what deepspeed.initialize does first; a no-op when it already ran
    ds_dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                             dist_init_required=False, verbose=False)
    name = group_name(ep_size)
    world, rank = dist.get_world_size(), dist.get_rank()
    expected_ep, expected_edp = expert_parallel_ranks(world, ep_size)
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ep_size)
    ep_ranks = list(ds_groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(ds_groups._get_expert_data_parallel_group_ranks(name))
    assert ep_ranks in expected_ep and edp_ranks in expected_edp and rank in ep_ranks, (
        f"DeepSpeed's expert groups {ep_ranks} / {edp_ranks} differ from the documented layout")
    return ExpertParallelGroups(ep_size=ep_size, ep_rank=ep_ranks.index(rank),
                                ep_group=ds_groups._get_expert_parallel_group(name),
                                edp_size=len(edp_ranks), edp_rank=edp_ranks.index(rank),
                                edp_group=ds_groups._get_expert_data_parallel_group(name))
