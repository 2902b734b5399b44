"""One dispatch for the Engram ops: `get_ops(backend)` -> object with the reference's functions.

Backends:
- `torch`: the plain-torch reference (`reference.py`), any device; the semantics and test oracle.
- `cpp`: the C++/OpenMP extension, CPU tensors (host-resident tables, pinned buffers).
- `cuda`: the CUDA extension, CUDA tensors (needs a CUDA build of torch).
- `auto`: per call, by the device of the table/param: CUDA tensors use `cuda` if it builds, CPU
  tensors use `cpp` if it builds, anything else (or a failed build) uses `torch` with a warning.
  The choice per device type is logged once.
- `cuda-emulated` (tests, not a config value): the CUDA kernels' bodies and launch configurations and
  the CUDA binding run on the CPU (`emulation/`), so the CUDA code paths run in the CPU suite.

`validate=False` (gathers, `sparse_adam_update_`) and `sparse_adam_step_nosync_` are the training paths
without host syncs: on the CUDA ops, id errors then go to a sticky device flag that
`check_deferred_errors()` reads (one sync) instead of being read back per call.

Explicit `cpp`/`cuda` build eagerly in `get_ops` and raise `OpBuildError` if they cannot; nothing is
built at import time.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Literal

import torch

from . import reference as ref
from .builder import OpBuildError, load_cpu_ops, load_cuda_ops, load_emulated_cuda_ops

logger = logging.getLogger(__name__)

Backend = Literal["auto", "cuda", "cpp", "torch"]
BACKENDS = ("auto", "cuda", "cpp", "torch")
TEST_BACKENDS = ("cuda-emulated",)
"""Backends `get_ops` accepts besides BACKENDS (not run settings)."""


def empty_rows(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool | None = None) -> torch.Tensor:
    """Host buffer for gathered rows; pinned when `pin_memory` (default: when CUDA is available)."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class TorchOps:
    """Reference ops (any device)."""

    name = "torch"

    def gather_rows(self, table: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor | None = None,
                    validate: bool = True) -> torch.Tensor:
        """table: [R, d], flat_ids: [...] -> [..., d]. `validate=False`: no host-side id range check
        (torch's indexing still refuses an out-of-range id)."""
        if validate:
            return ref.gather_rows(table, flat_ids, out)
        ref.check_table(table)
        rows = table.index_select(0, flat_ids.reshape(-1).long()).reshape(*flat_ids.shape, table.shape[1])
        return rows if out is None else out.copy_(rows)

    def multihead_gather(self, table: torch.Tensor, row_ids: torch.Tensor, head_offsets: torch.Tensor,
                         out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        """table: [R, d], row_ids: [..., H], head_offsets: [H] -> [..., H, d]."""
        return ref.multihead_gather(table, row_ids, head_offsets, out)

    def segment_reduce(self, row_ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """row_ids: [M], grads: [M, d] -> (unique_ids [U] ascending, summed [U, d])."""
        return ref.segment_reduce(row_ids, grads)

    def sparse_adam_update_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            step_per_row: torch.Tensor, unique_ids: torch.Tensor, grads: torch.Tensor,
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                            global_step: int | None = None, validate: bool = True) -> None:
        """Row-sparse AdamW in place on sorted unique rows; grads: [U, d]. `validate=False`: the caller
        guarantees sorted unique ids in range (a coalesce's output); nothing is checked."""
        ref.sparse_adam_update_(param, exp_avg, exp_avg_sq, step_per_row, unique_ids, grads, lr, beta1, beta2,
                                eps, weight_decay, global_step, check_rows=validate)

    def sparse_adam_step_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                          step_per_row: torch.Tensor, row_ids: torch.Tensor, grads: torch.Tensor, lr: float,
                          beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                          global_step: int | None = None) -> torch.Tensor:
        """segment_reduce + sparse_adam_update_ on raw lookups (row_ids [M] with duplicates) -> unique_ids."""
        return ref.sparse_adam_step_(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, lr, beta1,
                                     beta2, eps, weight_decay, global_step)

    def sparse_adam_step_nosync_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                                 step_per_row: torch.Tensor, row_ids: torch.Tensor, grads: torch.Tensor,
                                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                                 global_step: int | None = None) -> torch.Tensor:
        """`sparse_adam_step_` returning the number of touched rows as a 0-dim int64 tensor on the param's
        device instead of the rows: no host sync on the CUDA ops (ids are trusted: a sparse gradient's
        indices; an out-of-range id is reported by `check_deferred_errors`)."""
        unique = self.sparse_adam_step_(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, lr, beta1,
                                        beta2, eps, weight_decay, global_step)
        return torch.tensor(unique.numel(), dtype=torch.int64, device=param.device)

    def check_deferred_errors(self) -> None:
        """Raise IndexError if an unchecked call since the last check met an out-of-range id (CUDA ops: one
        host sync; the other backends check every call)."""


class ExtensionOps(TorchOps):
    """Ops backed by a compiled extension for one device type ("cpu" or "cuda")."""

    def __init__(self, name: str, module: ModuleType, device_type: str) -> None:
        self.name = name
        self.module = module
        self.device_type = device_type

    def _check_device(self, anchor: torch.Tensor, *others: torch.Tensor) -> None:
        if anchor.device.type != self.device_type:
            raise ValueError(f"{self.name} ops need {self.device_type} tensors, got {anchor.device} "
                             f"(use backend='auto' to dispatch by device)")
        for t in others:
            if t.device != anchor.device:
                raise ValueError(f"all tensors must be on {anchor.device}, got one on {t.device}")

    @staticmethod
    def _check_contiguous(**tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (in-place/large tensors are never copied)")

    def _gather_out(self, table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Check a gather's table and ids; the output [*ids.shape, d] (`out`, checked, or a new tensor)."""
        ref.check_table(table)
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"row ids must be int64 or int32, got {ids.dtype}")
        self._check_device(table, ids)
        self._check_contiguous(table=table)
        shape = (*ids.shape, table.shape[1])
        if out is None:
            return torch.empty(shape, dtype=table.dtype, device=table.device)
        ref.check_out(out, shape, table)
        if out.device.type != self.device_type:
            raise ValueError(f"out must be a {self.device_type} tensor, got {out.device}")
        return out

    def gather_rows(self, table: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor | None = None,
                    validate: bool = True) -> torch.Tensor:
        """C++ ops: ids are checked on the host either way (free)."""
        out = self._gather_out(table, flat_ids, out)
        self.module.gather_rows_into(table, flat_ids.contiguous(), out)
        return out

    def multihead_gather(self, table: torch.Tensor, row_ids: torch.Tensor, head_offsets: torch.Tensor,
                         out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        out, offsets = self._multihead_args(table, row_ids, head_offsets, out)
        if row_ids.numel() > 0:
            self.module.multihead_gather_into(table, row_ids.contiguous(), offsets, out)
        return out

    def _multihead_args(self, table: torch.Tensor, row_ids: torch.Tensor, head_offsets: torch.Tensor,
                        out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if head_offsets.dim() != 1 or row_ids.dim() < 1 or row_ids.shape[-1] != head_offsets.shape[0]:
            raise ValueError(f"row_ids {tuple(row_ids.shape)} must end in H = head_offsets "
                             f"{tuple(head_offsets.shape)}[0]")
        out = self._gather_out(table, row_ids, out)
        return out, head_offsets.to(device=table.device, dtype=torch.int64).contiguous()

    low_precision_grads = False
    """Whether the kernels read bf16/fp16 gradients themselves (else they are converted to fp32 first)."""

    def segment_reduce(self, row_ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if row_ids.dim() != 1 or grads.dim() != 2 or grads.shape[0] != row_ids.shape[0]:
            raise ValueError(f"segment_reduce: row_ids [M] and grads [M, d] expected, got "
                             f"{tuple(row_ids.shape)} and {tuple(grads.shape)}")
        if grads.dtype not in ref.FLOAT_DTYPES + ref.LOW_PRECISION:
            ref.accumulation_dtype(grads)  # raises, naming the dtype
        if not self.low_precision_grads:
            grads = ref.accumulation_dtype(grads)  # bf16/fp16 summed in fp32, as the reference does
        if row_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"row ids must be int64 or int32, got {row_ids.dtype}")
        self._check_device(grads, row_ids)
        unique, summed = self.module.segment_reduce(row_ids.contiguous(), grads.contiguous())
        return unique, summed

    def _check_adam(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    step_per_row: torch.Tensor, ids: torch.Tensor, grads: torch.Tensor, lr: float,
                    beta1: float, beta2: float, eps: float, global_step: int | None) -> torch.Tensor:
        """Validate; returns grads in the state dtype, contiguous."""
        ref.check_adam_args(param, exp_avg, exp_avg_sq, step_per_row, grads, lr, beta1, beta2, eps,
                            global_step)
        if ids.dim() != 1 or ids.shape[0] != grads.shape[0]:
            raise ValueError(f"ids [U] and grads [U, d] disagree: {tuple(ids.shape)} vs {tuple(grads.shape)}")
        self._check_device(param, exp_avg, exp_avg_sq, step_per_row, ids, grads)
        self._check_contiguous(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step_per_row=step_per_row)
        if self.low_precision_grads and grads.dtype in ref.LOW_PRECISION and exp_avg.dtype == torch.float32:
            return grads.contiguous()  # read as bf16/fp16 and summed in fp32 by the kernels
        return grads.to(exp_avg.dtype).contiguous()

    def sparse_adam_update_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            step_per_row: torch.Tensor, unique_ids: torch.Tensor, grads: torch.Tensor,
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                            global_step: int | None = None, validate: bool = True) -> None:
        state = (param, exp_avg, exp_avg_sq, step_per_row)
        g = self._check_adam(*state, unique_ids, grads, lr, beta1, beta2, eps, global_step)
        self.module.sparse_adam_update_(*state, unique_ids.long().contiguous(), g, lr, beta1, beta2, eps,
                                        weight_decay, global_step or 0)

    def sparse_adam_step_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                          step_per_row: torch.Tensor, row_ids: torch.Tensor, grads: torch.Tensor, lr: float,
                          beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                          global_step: int | None = None) -> torch.Tensor:
        state = (param, exp_avg, exp_avg_sq, step_per_row)
        g = self._check_adam(*state, row_ids, grads, lr, beta1, beta2, eps, global_step)
        if row_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"row ids must be int64 or int32, got {row_ids.dtype}")
        return self.module.sparse_adam_step_(*state, row_ids.contiguous(), g, lr, beta1, beta2, eps,
                                             weight_decay, global_step or 0)


class CudaStyleOps(ExtensionOps):
    """The ops of the shared CUDA binding (`include/engram_binding.h`): the CUDA extension, or its CPU grid
    emulation. bf16/fp16 gradients are read by the kernels (summed in fp32); `validate=False` calls and
    `sparse_adam_step_nosync_` read nothing back: their id errors go to a sticky flag per device that
    `check_deferred_errors` reads."""

    low_precision_grads = True

    def __init__(self, name: str, module: ModuleType, device_type: str) -> None:
        super().__init__(name, module, device_type)
        self._sticky: dict[torch.device, torch.Tensor] = {}

    def _flag(self, like: torch.Tensor, validate: bool) -> torch.Tensor:
        """A fresh zeroed flag (read back by this call) or the device's sticky flag (read later)."""
        if validate:
            return torch.zeros(1, dtype=torch.int32, device=like.device)
        flag = self._sticky.get(like.device)
        if flag is None:
            flag = self._sticky[like.device] = torch.zeros(1, dtype=torch.int32, device=like.device)
        return flag

    def check_deferred_errors(self) -> None:
        for device, flag in self._sticky.items():
            if int(flag.item()) != 0:
                flag.zero_()
                raise IndexError(f"engram {self.name} ops: a row id outside its table met an unchecked "
                                 f"call (validate=False / sparse_adam_step_nosync_) on {device} since the "
                                 "last check")

    def gather_rows(self, table: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor | None = None,
                    validate: bool = True) -> torch.Tensor:
        """`validate=False`: an out-of-range id zero-fills its row and raises the sticky flag (no sync)."""
        out = self._gather_out(table, flat_ids, out)
        self.module.gather_rows_into(table, flat_ids.contiguous(), out, self._flag(table, validate), validate)
        return out

    def multihead_gather(self, table: torch.Tensor, row_ids: torch.Tensor, head_offsets: torch.Tensor,
                         out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        out, offsets = self._multihead_args(table, row_ids, head_offsets, out)
        if row_ids.numel() > 0:
            self.module.multihead_gather_into(table, row_ids.contiguous(), offsets, out,
                                              self._flag(table, validate), validate)
        return out

    def sparse_adam_update_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            step_per_row: torch.Tensor, unique_ids: torch.Tensor, grads: torch.Tensor,
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                            global_step: int | None = None, validate: bool = True) -> None:
        """`validate=False`: the caller guarantees sorted unique ids (a coalesce's output); rows outside the
        table are skipped and raise the sticky flag."""
        state = (param, exp_avg, exp_avg_sq, step_per_row)
        g = self._check_adam(*state, unique_ids, grads, lr, beta1, beta2, eps, global_step)
        self.module.sparse_adam_update_(*state, unique_ids.long().contiguous(), g, lr, beta1, beta2, eps,
                                        weight_decay, global_step or 0, self._flag(param, validate), validate)

    def sparse_adam_step_nosync_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                                 step_per_row: torch.Tensor, row_ids: torch.Tensor, grads: torch.Tensor,
                                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                                 global_step: int | None = None) -> torch.Tensor:
        state = (param, exp_avg, exp_avg_sq, step_per_row)
        g = self._check_adam(*state, row_ids, grads, lr, beta1, beta2, eps, global_step)
        if row_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"row ids must be int64 or int32, got {row_ids.dtype}")
        count = self.module.sparse_adam_step_nosync_(*state, row_ids.contiguous(), g, lr, beta1, beta2, eps,
                                                     weight_decay, global_step or 0, self._flag(param, False))
        return count.reshape(())


def cpp_ops() -> ExtensionOps:
    """C++ CPU ops; builds on first use, raises OpBuildError when the build fails."""
    return ExtensionOps("cpp", load_cpu_ops(), "cpu")


def cuda_ops() -> ExtensionOps:
    """CUDA ops; builds on first use, raises OpBuildError when CUDA or the build is unavailable."""
    if not torch.cuda.is_available():
        raise OpBuildError("backend 'cuda' needs a CUDA device (torch.cuda.is_available() is False)")
    return CudaStyleOps("cuda", load_cuda_ops(), "cuda")


def emulated_cuda_ops() -> CudaStyleOps:
    """The CUDA ops' code (bodies, launch configurations, binding) run on the CPU: CPU tensors."""
    return CudaStyleOps("cuda-emulated", load_emulated_cuda_ops(), "cpu")


class AutoOps(TorchOps):
    """Chooses per call by the device of the first tensor argument; one log line per device type."""

    name = "auto"

    def __init__(self) -> None:
        self._chosen: dict[str, TorchOps] = {}
        self._lock = threading.Lock()

    def backend_for(self, device: torch.device) -> TorchOps:
        """The ops used for tensors on `device` (builds the extension on first need)."""
        kind = device.type
        ops = self._chosen.get(kind)
        if ops is not None:
            return ops
        with self._lock:
            if kind not in self._chosen:
                self._chosen[kind] = self._pick(kind)
            return self._chosen[kind]

    @staticmethod
    def _pick(kind: str) -> TorchOps:
        factory = {"cuda": cuda_ops, "cpu": cpp_ops}.get(kind)
        if factory is None:
            logger.warning("engram ops: no extension for %s tensors, using the torch reference", kind)
            return TorchOps()
        try:
            ops = factory()
        except OpBuildError as exc:
            logger.warning("engram ops: %s extension unavailable (%s); using the torch reference for %s "
                           "tensors", kind, str(exc).splitlines()[0], kind)
            return TorchOps()
        logger.info("engram ops: using the %s extension for %s tensors", ops.name, kind)
        return ops

    def gather_rows(self, table: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor | None = None,
                    validate: bool = True) -> torch.Tensor:
        return self.backend_for(table.device).gather_rows(table, flat_ids, out, validate)

    def multihead_gather(self, table: torch.Tensor, row_ids: torch.Tensor, head_offsets: torch.Tensor,
                         out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        return self.backend_for(table.device).multihead_gather(table, row_ids, head_offsets, out, validate)

    def segment_reduce(self, row_ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend_for(grads.device).segment_reduce(row_ids, grads)

    def sparse_adam_update_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            step_per_row: torch.Tensor, unique_ids: torch.Tensor, grads: torch.Tensor,
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                            global_step: int | None = None, validate: bool = True) -> None:
        ops = self.backend_for(param.device)
        ops.sparse_adam_update_(param, exp_avg, exp_avg_sq, step_per_row, unique_ids, grads, lr, beta1, beta2,
                                eps, weight_decay, global_step, validate)

    def sparse_adam_step_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                          step_per_row: torch.Tensor, row_ids: torch.Tensor, grads: torch.Tensor, lr: float,
                          beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                          global_step: int | None = None) -> torch.Tensor:
        ops = self.backend_for(param.device)
        return ops.sparse_adam_step_(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, lr, beta1,
                                     beta2, eps, weight_decay, global_step)

    def sparse_adam_step_nosync_(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                                 step_per_row: torch.Tensor, row_ids: torch.Tensor, grads: torch.Tensor,
                                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                                 global_step: int | None = None) -> torch.Tensor:
        ops = self.backend_for(param.device)
        return ops.sparse_adam_step_nosync_(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, lr,
                                            beta1, beta2, eps, weight_decay, global_step)

    def check_deferred_errors(self) -> None:
        for ops in list(self._chosen.values()):
            ops.check_deferred_errors()


_INSTANCES: dict[str, TorchOps] = {}
_INSTANCES_LOCK = threading.Lock()


def get_ops(backend: Backend = "auto") -> TorchOps:
    """Ops of `backend` (cached per process). Explicit cpp/cuda raise OpBuildError when unavailable."""
    if backend not in BACKENDS + TEST_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    with _INSTANCES_LOCK:
        ops = _INSTANCES.get(backend)
        if ops is None:
            factories = {"auto": AutoOps, "torch": TorchOps, "cpp": cpp_ops, "cuda": cuda_ops,
                         "cuda-emulated": emulated_cuda_ops}
            ops = factories[backend]()
            _INSTANCES[backend] = ops
            if backend != "auto":
                logger.info("engram ops: backend %s", backend)
        return ops


def resolve(ops: TorchOps, device: torch.device | str) -> TorchOps:
    """The ops that run for tensors on `device` (`auto` picks per device type; the others are themselves)."""
    return ops.backend_for(torch.device(device)) if isinstance(ops, AutoOps) else ops


def device_table_ops(ops: TorchOps | None, device: torch.device | str) -> TorchOps | None:
    """The kernel ops a device-resident table trains with (lookups and `RowSparseAdam`), or None for the
    torch path (`F.embedding`, sparse `coalesce`): a CUDA table uses the CUDA ops with backend auto (when
    they build) or cuda; a CPU table the C++ ops only with backend cpp (auto keeps the torch path there),
    or the emulated CUDA ops (tests)."""
    if ops is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and ops.name in ("auto", "cuda"):
        chosen = resolve(ops, device)
        return chosen if chosen.name == "cuda" else None
    if device.type == "cpu" and ops.name in ("cpp", "cuda-emulated"):
        return ops
    return None
