"""Activation recompute of whole blocks (`train.activation_checkpointing: full`).

`checkpointed(block, *args)` runs a block under torch's non-reentrant checkpoint: its activations are freed
after the forward and recomputed during the backward. The recomputation is flagged (`recomputing()`), so
modules with per-forward state keep the values of the real forward: the MoE load counts of loss-free
balancing are not counted twice, and the logged gate and load statistics are the forward's. A recomputed
forward sees the same inputs, parameters and row ids, so it produces the same values (the Engram lookup
reads the same rows; under expert parallelism the all-to-alls are repeated in the same order on every rank).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.checkpoint import checkpoint

_RECOMPUTING = contextvars.ContextVar("engram_pretrain_recomputing", default=False)


def recomputing() -> bool:
    """True while a checkpointed block is being recomputed for the backward."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recompute_flag() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with its activations recomputed in the backward (non-reentrant checkpoint)."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recompute_flag()))
