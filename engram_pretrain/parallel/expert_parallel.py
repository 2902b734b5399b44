"""Expert parallelism: the routed experts of every MoE layer split over an expert-parallel (EP) group.

Forward of one MoE layer on EP rank r (E experts, ep ranks; EP rank r holds the E_r experts
[b_r, b_{r+1}) of `groups.expert_bounds`: with q, m = divmod(E, ep), q + 1 on the first m ranks, q on the
others, so ep need not divide E):

1. the router (replicated, like the shared experts) picks K global expert ids per token; the loads for the
   loss-free bias are counted there, over all E experts (`MoE.load_accum`);
2. the N*K token slots are sorted by expert id, which groups them by destination rank;
3. per-expert slot counts [E] are exchanged with an `all_to_all_single` (E_j counts go to peer j, E_r
   counts arrive from every peer), so every rank knows how many rows it receives from each peer for each
   local expert;
4. the slot rows are exchanged with an uneven `all_to_all_single` (dispatch), regrouped by local expert,
   run through the local experts, put back in arrival order and returned with the reverse uneven
   all-to-all (combine);
5. the routing weights are applied **after** the combine, on the token's own rank: they never travel, and
   their gradient (and the router's) stays local. out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]), the
   same sum as `LocalExpertDispatcher`.

Dropless: every slot is computed, whatever the imbalance. Every rank takes part in both collectives of
every layer, also when it has no token at all or its experts receive none, and the local expert weights
stay in the autograd graph even when no row arrives, so they always get a gradient (zeros when unused)
and DeepSpeed's gradient hooks fire on every rank: nothing waits on an absent peer. The all-to-alls are an
autograd function whose backward is the reverse all-to-all with the splits swapped.

Training integration (`ExpertParallel`, built by `setup_expert_parallel`): DeepSpeed's own expert groups
(`parallel.groups`); routed expert parameters tagged `allreduce = False`, `group_name = "ep_size_<ep>"`,
the optimizer groups split with DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`, and a
parameter-free DeepSpeed `MoE` marker attached to the model so the engine switches on its MoE path: expert
gradients reduced (ZeRO 1/2: reduce-scattered and partitioned) over the expert-data-parallel group only,
averaged by the whole data-parallel world (each expert's gradient already sums the tokens of the whole EP
group), the global gradient norm combined over all experts. Expert weights are checkpointed by
`train.checkpoint.experts`, one file per EP rank with global expert ranges; DeepSpeed writes the ZeRO
partitions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .groups import ExpertParallelGroups, expert_bounds, expert_counts

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..model.moe import GroupedExperts
    from ..model.transformer import EngramMoEModel

logger = logging.getLogger(__name__)

EXPERT_WEIGHTS = ("w1", "w3", "w2")


# ---------------------------------------------------------------------------- differentiable all-to-all

class _AllToAll(torch.autograd.Function):
    """Uneven `all_to_all_single` along dim 0; backward: the reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: Any = None) -> Tensor:
    """x: [sum(input_splits), ...] -> [sum(output_splits), ...]; rows input_splits[j] go to rank j of
    `group`, rows output_splits[j] arrive from it. Differentiable; collective over `group`."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


# ---------------------------------------------------------------------------- dispatcher

class AllToAllExpertDispatcher:
    """`ExpertDispatcher` over an expert-parallel group (module docstring: the exchange, step by step)."""

    def __init__(self, ep_group: Any = None) -> None:
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """(count, first global expert) of this EP rank's contiguous range (`groups.expert_bounds`)."""
        bounds = expert_bounds(num_experts, self.ep_size)
        return bounds[self.ep_rank + 1] - bounds[self.ep_rank], bounds[self.ep_rank]

    def __call__(self, x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: GroupedExperts) -> Tensor:
        """x: [N, D], topk_idx: [N, K] global expert ids, topk_weight: [N, K] -> [N, D] in x's dtype."""
        n, k = topk_idx.shape
        e_loc, ep, num_experts = experts.num_experts, self.ep_size, experts.num_global_experts
        per_rank = expert_counts(num_experts, ep)  # [ep] experts of each EP rank
        count, first = self.local_experts(num_experts)
        if (experts.expert_offset, e_loc) != (first, count):
            raise ValueError(f"experts hold [{experts.expert_offset}, +{e_loc}) of {num_experts}; EP rank "
                             f"{self.ep_rank} of {ep} needs [{first}, +{count}) of {num_experts}")
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        flat_idx = topk_idx.reshape(-1)  # [N*K]
        order = torch.argsort(flat_idx, stable=True)  # slots by expert = by destination rank
        token_of_slot = order // k  # [N*K]
        send_counts = torch.bincount(flat_idx, minlength=num_experts)  # [E]
        if send_counts.numel() > num_experts:
            raise ValueError(f"expert index out of range for {num_experts} experts")
        recv_counts = send_counts.new_empty(ep * e_loc)  # [ep * E_l]: (source rank, local expert)
        dist.all_to_all_single(recv_counts, send_counts, [e_loc] * ep, per_rank, group=self.group)
        counts = torch.cat([send_counts, recv_counts]).cpu()  # one host copy for both
        send_splits = [int(c.sum()) for c in counts[:num_experts].split(per_rank)]  # rows to each rank
        recv_by_source = counts[num_experts:].view(ep, e_loc)
        recv_splits = recv_by_source.sum(dim=1).tolist()

        x_recv = all_to_all(x[token_of_slot], recv_splits, send_splits, self.group)  # [R, D] by source
        y_recv = self._run_local(x_recv, recv_by_source, experts)  # [R, D] same order
        y = all_to_all(y_recv, send_splits, recv_splits, self.group)  # [N*K, D] sorted-slot order

        w = topk_weight.reshape(-1)[order].to(acc_dtype).unsqueeze(-1)  # [N*K, 1]
        out = torch.zeros(n, x.shape[-1], dtype=acc_dtype, device=x.device)
        out.index_add_(0, token_of_slot, y.to(acc_dtype) * w)
        return out.to(x.dtype)

    @staticmethod
    def _run_local(x_recv: Tensor, recv_counts: Tensor, experts: GroupedExperts) -> Tensor:
        """x_recv: [R, D] rows grouped by source rank, then local expert; recv_counts: [ep, E_l] (CPU).

        Regroups the rows by local expert (stable: by source within an expert), runs the local experts on
        their blocks and restores the arrival order. The expert weights stay in the autograd graph also
        when no row arrives (a zero gradient then), so every rank's DeepSpeed gradient hooks fire."""
        if x_recv.shape[0] == 0:
            return experts.forward_expert(0, x_recv)  # [0, D], connected to the weights
        e_loc = experts.num_experts
        local_id = torch.arange(e_loc).repeat(recv_counts.shape[0])  # [ep * E_l] expert of each chunk
        expert_of_row = torch.repeat_interleave(local_id, recv_counts.reshape(-1)).to(x_recv.device)  # [R]
        perm = torch.argsort(expert_of_row, stable=True)  # [R] rows by local expert
        y_grouped = experts.forward_sorted(x_recv[perm], recv_counts.sum(dim=0).tolist())
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return y_grouped[inverse]


# ---------------------------------------------------------------------------- training integration

def check_expert_parallel_config(cfg: RunConfig, world_size: int, zero_stage: int) -> None:
    """ConfigError naming `parallel.ep_size` when it cannot be used for this world / ZeRO stage."""
    from ..config import ConfigError

    ep = cfg.parallel.ep_size
    num_experts = cfg.model.moe.num_routed_experts
    if ep < 1 or world_size % ep != 0:
        raise ConfigError(f"parallel.ep_size: {ep} must divide the world size {world_size} (world = data "
                          "parallel x expert parallel); launch a multiple of it or change parallel.ep_size")
    if ep > num_experts:
        raise ConfigError(f"parallel.ep_size: {ep} exceeds model.moe.num_routed_experts={num_experts}: every "
                          "expert-parallel rank needs at least one routed expert")
    if ep > 1 and zero_stage == 3:
        raise ConfigError("parallel.ep_size > 1 with ZeRO stage 3: DeepSpeed does not support expert "
                          "parallelism of custom MoE layers under ZeRO-3; use deepspeed.zero_stage 0, 1 or 2")
    if ep > 1 and cfg.model.moe.first_k_dense >= cfg.model.num_layers:
        raise ConfigError(f"parallel.ep_size: {ep} > 1 but the model has no MoE layer "
                          "(model.moe.first_k_dense >= model.num_layers)")


def is_expert_param(p: nn.Parameter) -> bool:
    """DeepSpeed's test for an expert-parallel parameter (`deepspeed.moe.utils.is_moe_param`)."""
    return getattr(p, "allreduce", True) is False


def split_expert_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move expert-parallel parameters into DeepSpeed MoE groups (`moe: True`, `name: ep_size_<ep>`, other
    keys copied from their source group); drop groups left empty. No-op without expert parameters."""
    if not any(is_expert_param(p) for g in groups for p in g["params"]):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


_MARKER_CLASS: type | None = None


def _deepspeed_marker_class() -> type:
    """A parameter-free subclass of DeepSpeed's `MoE` (built on first use: importing DeepSpeed is slow)."""
    global _MARKER_CLASS
    if _MARKER_CLASS is None:
        from deepspeed.moe.layer import MoE as DeepSpeedMoE

        class DeepSpeedExpertParallelMarker(DeepSpeedMoE):
            """Tells the DeepSpeed engine the model has expert-parallel MoE layers (`has_moe_layers`).

            Holds no parameters and no experts (`num_local_experts = 0`, so DeepSpeed writes and reads no
            per-expert files for it); never called. The experts are the model's `GroupedExperts`."""

            def __init__(self, num_experts: int, ep_size: int) -> None:
                nn.Module.__init__(self)
                self.ep_size = ep_size
                self.expert_group_name = f"ep_size_{ep_size}"
                self.num_experts = num_experts
                self.num_local_experts = 0
                self.use_residual = False
                self.enable_expert_tensor_parallelism = False

            def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
                from deepspeed.utils import groups as ds_groups

                if use_data_before_expert_parallel_:
                    raise ValueError("use_data_before_expert_parallel_ is not supported: the expert groups "
                                     "are consecutive ranks (engram_pretrain.parallel.groups)")
                assert self.expert_group_name in ds_groups._get_expert_parallel_group_dict()

            def forward(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("DeepSpeedExpertParallelMarker is a marker and is never called")

        _MARKER_CLASS = DeepSpeedExpertParallelMarker
    return _MARKER_CLASS


class ExpertParallel:
    """Expert parallelism of one training run: groups, dispatcher, DeepSpeed wiring, expert checkpoints."""

    MARKER_NAME = "deepspeed_expert_parallel"
    """Attribute name of the DeepSpeed marker module on the model."""

    def __init__(self, groups: ExpertParallelGroups) -> None:
        self.groups = groups
        self.dispatcher = AllToAllExpertDispatcher(groups.ep_group)

    @property
    def ep_size(self) -> int:
        return self.groups.ep_size

    def prepare_model(self, model: EngramMoEModel) -> None:
        """Tag the routed expert parameters for DeepSpeed and attach the marker (before the optimizer and
        `deepspeed.initialize`). Router, shared experts and everything else stay plain data parallel."""
        moes = model.moe_layers()
        if not moes:
            raise ValueError("expert parallelism needs a model with MoE layers")
        for moe in moes:
            assert moe.dispatcher is self.dispatcher, "build the model with ExpertParallel.dispatcher"
            for p in moe.experts.parameters():
                p.allreduce = False  # type: ignore[attr-defined]
                p.group_name = self.groups.name  # type: ignore[attr-defined]
        marker = _deepspeed_marker_class()(moes[0].num_experts, self.ep_size)
        model.add_module(self.MARKER_NAME, marker)

    # ------------------------------------------------------------------ full weights

    def full_expert_state(self, model: EngramMoEModel) -> dict[str, Tensor]:
        """{state-dict name: [E, ...] CPU tensor} of every routed expert weight, gathered over the EP group
        (collective over it). The other entries of the model's state dict are already whole. EP ranks may
        hold different expert counts: each sends its shard padded to the largest, the padding is dropped."""
        counts = expert_counts(model.moe_layers()[0].experts.num_global_experts, self.ep_size)
        out = {}
        for name, p in self.expert_params(model):
            padded = p.data.new_zeros((max(counts), *p.shape[1:]))
            padded[:p.shape[0]] = p.data
            parts = [torch.empty_like(padded) for _ in range(self.ep_size)]
            dist.all_gather(parts, padded, group=self.groups.ep_group)
            out[name] = torch.cat([part[:c] for part, c in zip(parts, counts, strict=True)]).detach().cpu()
        return out

    def local_expert_range(self, model: EngramMoEModel) -> tuple[list[str], int, int, int]:
        """(state-dict names of the routed expert weights, [E, ...] in a whole model; this EP rank's first
        and end global expert; the global expert count): what a rank takes from whole-model weights."""
        experts = model.moe_layers()[0].experts
        names = [name for name, _ in self.expert_params(model)]
        first = experts.expert_offset
        return names, first, first + experts.num_experts, experts.num_global_experts

    @staticmethod
    def expert_params(model: EngramMoEModel) -> list[tuple[str, nn.Parameter]]:
        names = {id(p): n for n, p in model.named_parameters()}
        return [(names[id(getattr(moe.experts, w))], getattr(moe.experts, w))
                for moe in model.moe_layers() for w in EXPERT_WEIGHTS]

def setup_expert_parallel(cfg: RunConfig, world_size: int, zero_stage: int) -> ExpertParallel | None:
    """Validate `parallel.ep_size` and, when > 1, create DeepSpeed's expert groups and the dispatcher
    (collective). None for ep_size 1 (plain data parallelism, `LocalExpertDispatcher`)."""
    from .groups import deepspeed_expert_parallel_groups

    check_expert_parallel_config(cfg, world_size, zero_stage)
    if cfg.parallel.ep_size == 1:
        return None
    if zero_stage == 0 and cfg.optimizer.grad_clip > 0 and dist.get_rank() == 0:
        logger.warning("parallel.ep_size > 1 with ZeRO stage 0: DeepSpeed clips by the mean of the per-rank "
                       "gradient norms (each counting only its own experts), not the exact global norm; "
                       "ZeRO 1/2 clip by the exact norm")
    return ExpertParallel(deepspeed_expert_parallel_groups(cfg.parallel.ep_size))
