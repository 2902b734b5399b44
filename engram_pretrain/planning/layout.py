"""A run layout (the knobs the planner varies), read from a run config, and the search for the smallest
layout that fits the GPUs (docs/parallelism.md, "Planning a layout")."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..config import RunConfig
from ..train.ds_config import build_ds_config


@dataclass(frozen=True)
class Layout:
    """How one run is laid out over the GPUs."""

    zero_stage: int
    ep_size: int
    table_sharding: str
    """replicated | sharded"""
    host_tables: bool
    activation_checkpointing: str
    """none | selective | full (a new mode is one function in `planning.activations`)"""
    micro_batch_size: int
    grad_accum_steps: int
    offload_optimizer: bool

    def changes_from(self, other: Layout) -> list[str]:
        """`key=value` of every field that differs from `other` (as dotted run-config overrides)."""
        keys = {"zero_stage": "deepspeed.zero_stage", "ep_size": "parallel.ep_size",
                "table_sharding": "parallel.table_sharding", "host_tables": "parallel.host_tables",
                "activation_checkpointing": "train.activation_checkpointing",
                "micro_batch_size": "train.micro_batch_size", "grad_accum_steps": "train.grad_accum_steps",
                "offload_optimizer": "deepspeed.offload_optimizer"}
        out = []
        for f, key in keys.items():
            mine, theirs = getattr(self, f), getattr(other, f)
            if mine != theirs:
                value = str(mine).lower() if isinstance(mine, bool) else mine
                out.append(f"{key}={value}")
        return out


@dataclass(frozen=True)
class DeepSpeedKnobs:
    """The DeepSpeed settings that size buffers (from the run's DeepSpeed JSON, `train.ds_config`)."""

    bf16: bool
    reduce_bucket_size: int
    allgather_bucket_size: int
    overlap_comm: bool
    stage3_prefetch_bucket_size: int
    stage3_param_persistence_threshold: int
    stage3_max_live_parameters: int
    sub_group_size: int


def deepspeed_knobs(cfg: RunConfig, world: int, use_cuda: bool = True) -> DeepSpeedKnobs:
    """Bucket sizes etc. of the run's DeepSpeed config (`build_ds_config`; DeepSpeed defaults if unset)."""
    ds = build_ds_config(cfg, world, use_cuda=use_cuda)
    z = ds["zero_optimization"]
    return DeepSpeedKnobs(
        bf16=bool(ds["bf16"]["enabled"]),
        reduce_bucket_size=int(z.get("reduce_bucket_size", 500_000_000)),
        allgather_bucket_size=int(z.get("allgather_bucket_size", 500_000_000)),
        overlap_comm=bool(z.get("overlap_comm", z.get("stage", 0) == 3)),
        stage3_prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
        stage3_param_persistence_threshold=int(z.get("stage3_param_persistence_threshold", 100_000)),
        stage3_max_live_parameters=int(z.get("stage3_max_live_parameters", 1_000_000_000)),
        sub_group_size=int(z.get("sub_group_size", 1_000_000_000)))


def layout_of(cfg: RunConfig) -> Layout:
    """The layout a run config asks for (the ZeRO stage as `train.ds_config` resolves it)."""
    ds = build_ds_config(cfg, 1, use_cuda=True)
    return Layout(zero_stage=int(ds["zero_optimization"]["stage"]), ep_size=cfg.parallel.ep_size,
                  table_sharding=cfg.parallel.table_sharding, host_tables=cfg.parallel.host_tables,
                  activation_checkpointing=cfg.train.activation_checkpointing,
                  micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
                  offload_optimizer="offload_optimizer" in ds["zero_optimization"])


def layout_problem(layout: Layout, num_experts: int, world: int, bf16: bool) -> str | None:
    """Why DeepSpeed or the trainer cannot run `layout` on `world` ranks (None when it can)."""
    if layout.ep_size > num_experts:
        return f"parallel.ep_size={layout.ep_size} exceeds the {num_experts} routed experts"
    if world % layout.ep_size:
        return f"parallel.ep_size={layout.ep_size} does not divide the world size {world}"
    if layout.ep_size > 1 and layout.zero_stage == 3:
        return "parallel.ep_size > 1 needs ZeRO stage 0-2 (DeepSpeed has no ZeRO-3 expert parallelism)"
    if layout.zero_stage == 0 and bf16:
        return ("ZeRO stage 0 with bf16: DeepSpeed has no bf16 optimizer with fp32 gradient accumulation "
                "without ZeRO")
    if layout.offload_optimizer and layout.zero_stage == 0:
        return "deepspeed.offload_optimizer needs ZeRO stage >= 1"
    if layout.activation_checkpointing == "selective" and layout.zero_stage == 3:
        return "train.activation_checkpointing=selective needs ZeRO stage 0-2"
    return None


def candidate_layouts(base: Layout, num_experts: int, world: int, bf16: bool) -> Iterator[Layout]:
    """Every runnable layout the search considers; the global batch (micro-batch x accumulation) is kept."""
    ep_sizes = sorted({e for e in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, base.ep_size, num_experts)
                       if e <= num_experts and world % e == 0})
    global_micro = base.micro_batch_size * base.grad_accum_steps
    micro = sorted({m for m in range(1, base.micro_batch_size + 1) if global_micro % m == 0}, reverse=True)
    for stage in (0, 1, 2, 3):
        for ep in ep_sizes:
            for sharding in ("replicated", "sharded"):
                for host in (False, True):
                    for ckpt in ("none", "selective", "full"):
                        for mbs in micro:
                            for offload in (False, True):
                                layout = Layout(stage, ep, sharding, host, ckpt, mbs, global_micro // mbs,
                                                offload)
                                if layout_problem(layout, num_experts, world, bf16) is None:
                                    yield layout
