"""Run a function on N gloo processes of one machine and collect each rank's return value.

    def body(rank: int, world_size: int, scale: float) -> float: ...
    results = run_distributed(body, world_size=2, args=(0.5,))  # [result of rank 0, result of rank 1]

`body` must be a module-level (picklable) function; processes are spawned, so it runs in a fresh
interpreter with `torch.distributed` initialised (gloo, free port) and `DS_ACCELERATOR=cpu`. An
exception on any rank is re-raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from ..train.distributed import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
            env: dict[str, str], queue: Any) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu",
                       "OMP_NUM_THREADS": "1"})
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, True, _serialised(fn(rank, world_size, *args))))
    except BaseException:  # report every failure to the parent, which re-raises it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serialised(value: Any) -> bytes:
    """`value` as torch.save bytes: tensors travel by value, not as shared-memory handles that die with the
    worker before the parent reads them."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (),
                    env: dict[str, str] | None = None, timeout: float = 300.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, env or {}, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
