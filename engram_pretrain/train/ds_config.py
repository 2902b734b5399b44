"""The DeepSpeed config of a run: a `ds_configs/*.json` file with the run settings written over it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import REPO_ROOT, ConfigError, RunConfig, deep_merge

logger = logging.getLogger(__name__)

AUTO = "auto"
"""Placeholder in `ds_configs/*.json` for a value the run settings fill in."""


def resolve_repo_path(path: str | Path) -> Path:
    """An absolute path, a path relative to the working directory, or one relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []


def build_ds_config(cfg: RunConfig, world_size: int, use_cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: `cfg.deepspeed.config` (JSON) with the run settings written over it.

    Set from the run: batch sizes, gradient accumulation and clipping, the ZeRO stage override, bf16
    (GPU only; CPU runs stay fp32), optimizer offload; then `cfg.deepspeed.overrides` merged last.
    The JSON must not define `optimizer` or `scheduler`: both come from the run config.
    """
    s = cfg.deepspeed
    path = resolve_repo_path(s.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {s.config} not found (looked in the working directory and "
                          f"{REPO_ROOT}); use one of ds_configs/*.json")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    for key in ("optimizer", "scheduler"):
        if key in ds or key in s.overrides:
            raise ConfigError(f"deepspeed.config: {path} defines '{key}', but the {key} comes from the run "
                              f"config (optimizer.*, schedule.*); remove it from the DeepSpeed JSON")
    if use_cuda is None:
        use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    zero = dict(ds.get("zero_optimization", {}))
    if s.zero_stage is not None:
        zero["stage"] = s.zero_stage
    zero.setdefault("stage", 0)
    if s.offload_optimizer:
        if zero["stage"] == 0:
            raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage >= 1 (set deepspeed.zero_stage)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_cuda)}
    ds["zero_optimization"] = zero
    bf16 = bool(s.bf16 and use_cuda)
    if s.bf16 and not use_cuda:
        logger.warning("deepspeed.bf16 is ignored on CPU: the run stays fp32")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if bf16:  # accumulate and reduce gradients in fp32 (DeepSpeed's default under bf16 is bf16)
        ds["data_types"] = {"grad_accum_dtype": "fp32", **ds.get("data_types", {})}
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("deepspeed.config: fp16 is not supported (MoE router and Engram gates need range); "
                          "use deepspeed.bf16")
    ds.pop("fp16", None)
    # A client optimizer (torch AdamW subclass) also under ZeRO-Offload.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    ds = deep_merge(ds, s.overrides)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"deepspeed.config: {path} leaves {', '.join(left)} as 'auto' and the run settings "
                          "do not fill it; give a value in the JSON or in deepspeed.overrides")
    return ds
