"""The plan of one layout (memory, communication, FLOPs, step time) and the search for the smallest layout
that fits (docs/parallelism.md, "Planning a layout").

Fit: device bytes (model states + activations of one micro-batch + the recompute peak + the loss's logits
buffers + DeepSpeed's buckets) <= `usable` x HBM; the rest is left to the CUDA context, NCCL and the
allocator's fragmentation. Search: every runnable layout (`layout.candidate_layouts`, global batch kept)
that fits, ranked by estimated step time (compute at the stated efficiency + communication without overlap,
optimizer offload charged its PCIe traffic), then by how many settings differ from the run config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import RunConfig
from .activations import ActivationBytes, activations_for, logits_buffer_bytes
from .comm import CommBytes, StepFlops, comm_bytes, step_flops
from .hardware import Cluster
from .inventory import ModelInventory, model_inventory
from .layout import DeepSpeedKnobs, Layout, candidate_layouts, deepspeed_knobs, layout_of, layout_problem
from .memory import StateBytes, backbone_state, buffer_bytes, state_bytes

PCIE_BW = 25e9
"""Host <-> device bandwidth per GPU (PCIe gen4/5 x16, effective), bytes/s."""


@dataclass(frozen=True)
class Assumptions:
    """Stated numbers the plan depends on."""

    efficiency: float = 0.4
    """Fraction of the bf16 peak the compute reaches (model + recompute FLOPs)."""
    dedup: float = 0.5
    """Fraction of a micro-batch's table ids that are duplicates."""
    usable: float = 0.9
    """Fraction of HBM the planner lets a layout use."""


@dataclass
class LayoutPlan:
    """Everything the planner says about one layout."""

    layout: Layout
    state: StateBytes
    activations: ActivationBytes
    logits: int
    buffers: dict[str, int]
    comm: CommBytes
    flops: StepFlops
    compute_s: float
    comm_s: float
    offload_s: float
    hbm: float
    usable: float
    peak_flops: float
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def device_bytes(self) -> int:
        return (self.state.device_total + self.activations.peak + self.logits + sum(self.buffers.values()))

    @property
    def fits(self) -> bool:
        return self.problem is None and self.device_bytes <= self.usable * self.hbm

    @property
    def step_s(self) -> float:
        """Compute + communication + offload traffic, nothing overlapped (an upper estimate)."""
        return self.compute_s + self.comm_s + self.offload_s

    @property
    def mfu(self) -> float:
        """Model FLOPs over peak x step time (compute only: the stated efficiency less the recompute)."""
        return self.flops.model / (self.compute_s * self.peak_flops) if self.compute_s else 0.0

    @property
    def mfu_with_comm(self) -> float:
        return self.flops.model / (self.step_s * self.peak_flops) if self.step_s else 0.0


def plan_layout(cfg: RunConfig, layout: Layout, cluster: Cluster, assumptions: Assumptions,
                inv: ModelInventory | None = None, ds: DeepSpeedKnobs | None = None) -> LayoutPlan:
    """The plan of `layout` for `cfg` on `cluster` (bf16 as the run's deepspeed.bf16 says, on GPUs)."""
    inv = inv or model_inventory(cfg.model, cfg.optimizer)
    ds = ds or deepspeed_knobs(cfg, cluster.world, use_cuda=True)
    experts = cfg.model.moe.num_routed_experts
    seq = cfg.data.seq_len
    state = state_bytes(inv, layout, cluster.world, experts, ds)
    acts = activations_for(cfg, layout.micro_batch_size, layout.activation_checkpointing, ds.bf16)
    logits = logits_buffer_bytes(cfg.model, layout.micro_batch_size * seq, ds.bf16)
    comm = comm_bytes(cfg.model, inv, layout, cluster, seq, ds.bf16, assumptions.dedup)
    flops = step_flops(cfg.model, inv, layout, seq, cfg.train.activation_checkpointing_every)
    peak = cluster.gpu.peak_bf16_flops
    compute_s = flops.hardware / (peak * assumptions.efficiency)
    offload_s = 0.0
    if layout.offload_optimizer:  # the fp32 gradient partition goes down, the updated parameters come up
        on_device = replace(layout, offload_optimizer=False)
        master = backbone_state(inv, on_device, cluster.world, experts, ds).master
        offload_s = master * (1 + (2 if ds.bf16 else 4) / 4) / PCIE_BW
    plan = LayoutPlan(layout=layout, state=state, activations=acts, logits=logits,
                      buffers=buffer_bytes(inv, layout, ds), comm=comm, flops=flops, compute_s=compute_s,
                      comm_s=comm.seconds, offload_s=offload_s, hbm=cluster.gpu.hbm_bytes,
                      usable=assumptions.usable, peak_flops=peak,
                      problem=layout_problem(layout, experts, cluster.world, ds.bf16))
    if experts % layout.ep_size:
        plan.notes.append(f"ep_size {layout.ep_size} does not divide {experts} experts: the largest rank "
                          f"holds {-(-experts // layout.ep_size)} (counted), the smallest "
                          f"{experts // layout.ep_size}")
    if layout.offload_optimizer:
        plan.notes.append("optimizer offload: the host Adam step itself is not timed")
    return plan


@dataclass
class PlanReport:
    """The run's own layout and, when it does not fit, the best layout that does."""

    cfg: RunConfig
    cluster: Cluster
    assumptions: Assumptions
    requested: LayoutPlan
    proposal: LayoutPlan | None
    changes: list[str]
    considered: int


def plan_run(cfg: RunConfig, cluster: Cluster, assumptions: Assumptions | None = None,
             search: bool = True) -> PlanReport:
    """Plan `cfg`'s own layout on `cluster`; if it does not fit (or cannot run), search for the best one that
    does (module docstring). `proposal` is None when nothing fits."""
    assumptions = assumptions or Assumptions()
    inv = model_inventory(cfg.model, cfg.optimizer)
    ds = deepspeed_knobs(cfg, cluster.world, use_cuda=True)
    base = layout_of(cfg)
    requested = plan_layout(cfg, base, cluster, assumptions, inv, ds)
    proposal, considered = None, 0
    if search and not requested.fits:
        best: tuple[float, int] | None = None
        for layout in candidate_layouts(base, cfg.model.moe.num_routed_experts, cluster.world, ds.bf16):
            considered += 1
            p = plan_layout(cfg, layout, cluster, assumptions, inv, ds)
            if not p.fits:
                continue
            key = (round(p.step_s, 6), len(layout.changes_from(base)))
            if best is None or key < best:
                best, proposal = key, p
    changes = proposal.layout.changes_from(base) if proposal is not None else []
    return PlanReport(cfg=cfg, cluster=cluster, assumptions=assumptions, requested=requested,
                      proposal=proposal, changes=changes, considered=considered)
