"""GPU and interconnect figures the planner uses (vendor datasheet values, dense bf16 without sparsity)."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
"""The planner reports decimal gigabytes (10^9 bytes), as the HBM capacities below are stated."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model."""

    name: str
    peak_bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    hbm_bytes: float
    """Device memory, bytes."""
    intra_node_bw: float
    """Per-GPU NVLink bandwidth one way, bytes/s."""
    inter_node_bw: float
    """Per-GPU network bandwidth one way (one 400 Gb/s NIC per GPU), bytes/s."""


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 989e12, 80 * GB, 450 * GB, 50 * GB),
    "h200": GpuSpec("h200", 989e12, 141 * GB, 450 * GB, 50 * GB),
    "a100": GpuSpec("a100", 312e12, 80 * GB, 300 * GB, 25 * GB),
}


def gpu_spec(name: str) -> GpuSpec:
    """The spec of `name` (h100 | h200 | a100); ValueError naming the choices otherwise."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"--gpu: unknown '{name}' (expected one of {', '.join(GPUS)})")
    return GPUS[key]


@dataclass(frozen=True)
class Cluster:
    """The machines of a run."""

    nodes: int
    gpus_per_node: int
    gpu: GpuSpec

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def group_bandwidth(self, group_size: int, strided: bool = False) -> float:
        """Per-GPU bandwidth of a collective over `group_size` ranks: NVLink when the group fits in one node
        (consecutive ranks; a strided group spans nodes as soon as it has more than one member per node
        stride), the network otherwise."""
        if group_size <= 1:
            return float("inf")
        inside = group_size <= self.gpus_per_node and not (strided and self.nodes > 1)
        return self.gpu.intra_node_bw if inside else self.gpu.inter_node_bw
