"""The run's two optimizers: the backbone's client optimizer handed to DeepSpeed (`GuardedAdamW` or
`Muon`, no DeepSpeed scheduler: the trainer sets every group's LR each step) and the tables' row-sparse
Adam, which never goes through DeepSpeed."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig
from ..memory.table_store import TableStore
from ..parallel.expert_parallel import split_expert_param_groups


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step when a gradient is non-finite and says so in `overflow`.

    DeepSpeed's ZeRO optimizers (stages 1-3) already skip a step whose global gradient norm is not finite
    before this optimizer is reached, so there `check_finite=False` and the step does no second pass over
    the gradients (and no host sync). Without ZeRO, DeepSpeed calls this optimizer directly on the
    all-reduced (hence rank-identical) gradients and reads `overflow` to count a skipped step.
    """

    def __init__(self, *args: Any, check_finite: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_finite = check_finite
        self.overflow = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self.check_finite:
            return super().step(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return None
        return super().step(closure)


def build_backbone_optimizer(model: nn.Module, cfg: RunConfig,
                             ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """Client optimizer over the backbone + Engram dense parameters (the tables are not in the model).

    `adamw`: `GuardedAdamW` over `param_groups_for` (any ZeRO stage). `muon`: `train.muon.Muon` (Muon for the
    hidden matrices, AdamW for the rest), which needs whole matrices: ZeRO stage 0 in fp32 only.
    """
    from .param_groups import param_groups_for

    o = cfg.optimizer
    groups = param_groups_for(model, o)
    for g in groups:
        g.setdefault("lr", o.lr)
        g["base_lr"] = g["lr"]
    groups = split_expert_param_groups(groups)  # expert-parallel params -> DeepSpeed MoE groups (EP > 1)
    betas = (o.betas[0], o.betas[1])
    if o.name == "muon":
        if ds_config["zero_optimization"]["stage"] != 0 or ds_config["bf16"]["enabled"]:
            raise ConfigError("optimizer.name=muon needs whole weight matrices: use deepspeed.zero_stage=0 "
                              "without bf16 (ZeRO and DeepSpeed's bf16 optimizer hand it flat partitions)")
        from .muon import Muon

        return Muon(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum,
                    ns_steps=o.muon_ns_steps, betas=betas, eps=o.eps)
    zero = ds_config["zero_optimization"]["stage"] > 0  # ZeRO checks the gradient norm itself
    return GuardedAdamW(groups, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay,
                        check_finite=not zero)


def build_table_optimizer(store: TableStore, cfg: RunConfig) -> Any | None:
    """Row-sparse Adam of the tables: lr x engram_lr_multiplier, engram_weight_decay (paper: 0).

    Replicated tables average the row gradients over the data-parallel ranks (`grad_sync="mean"`); sharded
    tables already received them on the owner (`ShardedTable` divides by the world: the same mean), so each
    rank steps its own rows (`"none"`). Host tables are stepped by the store's kernel ops (C++ sparse Adam
    on the host); replicated host tables exchange their row gradients over a gloo group of their own.
    Collective (may create a process group)."""
    if not store.tables:
        return None
    from ..memory.sparse_optim import RowSparseAdam

    o = cfg.optimizer
    params = list(store.tables.values())
    kwargs: dict[str, Any] = dict(lr=o.lr * o.engram_lr_multiplier, betas=(o.betas[0], o.betas[1]), eps=o.eps,
                                  weight_decay=o.engram_weight_decay,
                                  grad_sync="none" if store.sharded else "mean")
    if not store.host:  # device tables: the compiled ops where they resolve (CUDA, or cpp on CPU), else torch
        return RowSparseAdam(params, ops=store.device_ops, process_group=None, **kwargs)
    group = None
    if not store.sharded and dist.is_initialized() and dist.get_world_size() > 1:
        # host rows never enter the default group (NCCL has no CPU tensors): a gloo group of their own
        # under every backend, so the gloo suite runs what a GPU run does (docs/training.md, device-strict)
        group = dist.new_group(ranks=list(range(dist.get_world_size())), backend="gloo")
    return RowSparseAdam(params, ops=store.ops, process_group=group, **kwargs)
