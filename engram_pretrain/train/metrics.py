"""Training metrics: throughput and MFU from activated parameters, MoE/Engram health, and the sinks.

MFU = 6 x N_act x tokens_per_second / (peak FLOP/s per device x devices), where N_act is the activated
parameter count *with* the LM head and without the token embedding and the Engram tables
(`analysis.params.ParamCounts.activated_with_head`): each token passes through the dense weights, the
shared experts, top_k of the routed experts, the Engram projections and the head. Attention-score FLOPs
(12 x layers x d x T per token) are not counted, as in the usual 6N estimate. Peak FLOP/s per device are
in `PEAK_FLOPS` (dense, no sparsity); on CPU a nominal per-thread value is used and labelled as such.
`ENGRAM_PEAK_FLOPS=<flop/s per device>` overrides the table.

Sinks (rank 0): a one-line console summary, `metrics.jsonl`, TensorBoard event files, and W&B when
`logging.wandb` is on and the package is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PEAK_FLOPS: dict[str, dict[str, float]] = {
    # device-name substring -> dense peak FLOP/s per device by training dtype (GPU fp32 = TF32 tensor cores)
    "H200": {"bf16": 989e12, "fp32": 494.5e12},
    "H100": {"bf16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
}
CPU_NOMINAL_FLOPS_PER_THREAD = 50e9
"""Nominal fp32 matmul rate of one x86 core (measured ~50 GFLOP/s/thread on the 2-core CI machine)."""


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one device, label saying where the number comes from)."""
    env = os.environ.get("ENGRAM_PEAK_FLOPS")
    if env:
        return float(env), "ENGRAM_PEAK_FLOPS"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dtype = "bf16" if bf16 else "fp32"
        for key, peaks in PEAK_FLOPS.items():
            if key in name:
                return peaks[dtype], f"{key} {dtype} dense peak"
        logger.warning("no peak FLOP/s known for %s; MFU uses the H100 value", name)
        return PEAK_FLOPS["H100"][dtype], f"unknown GPU ({name}), H100 {dtype} assumed"
    threads = torch.get_num_threads()
    return CPU_NOMINAL_FLOPS_PER_THREAD * threads, f"cpu nominal {CPU_NOMINAL_FLOPS_PER_THREAD / 1e9:.0f} " \
                                                   f"GFLOP/s x {threads} thread(s)"


def mfu(activated_params: int, tokens_per_second: float, peak_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation from activated parameters (6N per token: forward + backward)."""
    return 6.0 * activated_params * tokens_per_second / (peak_per_device * num_devices)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Host RSS (current and peak, GB) and, on CUDA, the max allocated device memory (GB)."""
    out: dict[str, float] = {"rss_gb": _current_rss() / 1e9,
                             "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    if device.type == "cuda":
        out["cuda_max_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_stats(load: torch.Tensor) -> dict[str, float]:
    """Per-expert counts [E] of a global batch -> min, max (as fractions of the mean) and MaxVio."""
    load = load.double()
    mean = load.mean().item()
    if mean <= 0:
        return {"min": 0.0, "max": 0.0, "maxvio": 0.0}
    return {"min": load.min().item() / mean, "max": load.max().item() / mean,
            "maxvio": (load.max().item() - mean) / mean}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"moe": {"layer1": {"maxvio": x}}} -> {"moe/layer1/maxvio": x}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def console_line(step: int, total: int, m: dict[str, Any]) -> str:
    """The concise rank-0 one-liner of a log interval."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if m.get("val_loss") is not None:
        parts.append(f"val {m['val_loss']:.4f}")
    parts.append(f"lr {m['lr']:.2e}")
    if m.get("grad_norm") is not None:
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    parts.append(f"{m['tokens_per_s'] / 1e3:.1f}k tok/s")
    parts.append(f"MFU {100 * m['mfu']:.2f}%")
    if m.get("maxvio") is not None:
        parts.append(f"maxvio {m['maxvio']:.2f}")
    if m.get("engram_gate") is not None:
        parts.append(f"gate {m['engram_gate']:.2f}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    parts.append(f"mem {m['memory']['max_rss_gb']:.2f}GB")
    return " | ".join(parts)


class MetricsSink:
    """Writes metric records on rank 0 (other ranks: no-ops)."""

    def __init__(self, run_dir: str | Path, rank: int, jsonl: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "engram-pretrain", run_name: str = "run",
                 config: dict[str, Any] | None = None) -> None:
        self.rank = rank
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; TensorBoard logging is off")
        if wandb:
            try:
                import wandb as wandb_module

                self._wandb = wandb_module.init(project=wandb_project, name=run_name, config=config,
                                                dir=str(self.run_dir), resume="allow")
            except ImportError:
                logger.warning("logging.wandb is on but wandb is not installed; W&B logging is off")

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One record: nested dicts are flattened to `a/b/c` keys for TensorBoard and W&B."""
        if self.rank != 0:
            return
        flat = {k: _clean(v) for k, v in flatten(record).items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
            self._jsonl.flush()
        scalars = {k: v for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
