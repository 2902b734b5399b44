"""The process group of a run: torch.distributed from the launcher's environment (or a world of one),
seeding, and DeepSpeed's console noise."""

from __future__ import annotations

import logging
import os
import random
import socket
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise torch.distributed from the launcher's environment (torchrun, deepspeed, srun) or, when
    no launcher set RANK/WORLD_SIZE, as a world of one. `backend`: auto | nccl | gloo."""
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def enable_deterministic() -> None:
    """`torch.use_deterministic_algorithms(True)`, with the cuBLAS workspace setting it requires on CUDA
    (without `CUBLAS_WORKSPACE_CONFIG` the first cuBLAS matmul raises); an explicit setting is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _DropExpected(logging.Filter):
    """Drops DeepSpeed's warning about our (deliberate) client AdamW subclass under ZeRO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's per-step INFO lines and torch's collective deprecation warnings off the console."""
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropExpected) for f in ds_logger.filters):
        ds_logger.addFilter(_DropExpected())
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+ is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
