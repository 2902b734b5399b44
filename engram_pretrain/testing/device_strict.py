"""Device-strict mode for the gloo test suite: the NCCL placement rules, enforced on a CPU.

Under NCCL a collective on a CPU tensor raises (the default group has no CPU backend) and an op that mixes
a CPU tensor with GPU tensors raises too (CPU 0-dim scalars excepted). On a CPU run every tensor is a CPU
tensor, so neither can fail. `DeviceStrictMode` (a `TorchFunctionMode`) tells the two placements apart by
bookkeeping, with `STRICT_DEVICE` (`cpu:0`, a value no CPU tensor reports by itself) as the training device:

- **host tensors**: results of factory calls (`torch.tensor/zeros/empty/full/arange/from_numpy`, ...) without
  a device or with the device `cpu` made by our code, of `.cpu()`, `.pin_memory()`, `.to("cpu")`, and the
  tensors named by `mark_host` (host-table rows). A `.to(STRICT_DEVICE)` / `device=STRICT_DEVICE` result is a
  device tensor (`.to` returns `self` or a view, never a copy, as `.to` of the same device does on a GPU;
  autograd is kept). Every other op propagates: outputs are host tensors when a host tensor went in and no
  device tensor did. A gradient lives where its tensor lives. Unmarked tensors (parameters, buffers, batches
  moved by the trainer) are device tensors; `tensor.device` reports `STRICT_DEVICE` for them and `cpu` for
  host tensors, so `device=x.device` places like `x`.
- **checks**: an op whose inputs mix a host tensor of dim > 0 with a device tensor raises `DeviceStrictError`
  (as CUDA does; `copy_`, `.to`, indexing and item assignment may cross); a `torch.distributed` collective
  called from `engram_pretrain` raises when a host tensor enters it, unless its group is one of
  `host_groups` (gloo groups meant for host tensors, e.g. the row-gradient group of replicated host tables),
  which in turn take host tensors only. The error names the calling line (`module:function: line`) and where
  the host tensor was made.

Third-party code (DeepSpeed, torch) names its accelerator `cpu` on a CPU run: there `cpu` counts as the
training device, and its own collectives are not checked (its buffers are on the GPU under NCCL).
Python-level custom autograd backwards (`torch.autograd.Function`) run inside the mode too; the C++ engine's
own backward kernels are not seen. The mode is thread-local: background threads (host-tier gathers) are not
tracked, their results only cross by `copy_`. `device_strict(...)` combines it with the host-sync recorder
(`testing.host_sync`), which then leaves out reads of host tensors (no GPU sync). Rules and what the
mode found: docs/training.md, "Device-strict mode".
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

from .host_sync import HostSyncRecorder

STRICT_DEVICE = torch.device("cpu", 0)
"""The training device of a device-strict CPU run (`strict_training_device()` builds a trainer on it)."""

PACKAGE = Path(__file__).resolve().parents[1]
TESTING = Path(__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
_HOST = "_engram_host_origin"  # attribute of a host tensor: where it became one

FACTORIES = {
    "tensor", "as_tensor", "asarray", "from_numpy", "frombuffer", "zeros", "ones", "empty", "full", "arange",
    "range", "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm", "empty_strided",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "sparse_coo_tensor", "scalar_tensor",
}
"""Calls whose placement comes from a `device` argument (else from their tensor inputs, else the host)."""
CROSSING = {"copy_", "to", "__getitem__", "__setitem__", "__set__", "set_", "cpu", "pin_memory", "numpy",
            "tolist", "item", "is_pinned", "data_ptr", "__repr__", "__format__", "__reduce_ex__"}
"""Calls that may take host and device tensors together."""
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
               "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send",
               "recv", "isend", "irecv")


class DeviceStrictError(RuntimeError):
    """A tensor off the training device entered a collective or a device op."""


def is_host(t: torch.Tensor) -> bool:
    """Whether `t` is a host tensor in the current bookkeeping."""
    return hasattr(t, _HOST)


def mark_host(tensors: Iterable[torch.Tensor], origin: str = "marked as host") -> None:
    """Declare tensors made before the mode as host-resident (host-table rows and their Adam state)."""
    for t in tensors:
        setattr(t, _HOST, origin)


def host_resident_tensors(components: Any) -> list[torch.Tensor]:
    """The host-resident tensors of a trainer: host-tier table rows and their optimizer state."""
    store = components.tables
    out: list[torch.Tensor] = []
    if not store.host:
        return out
    for p in store.tables.values():
        out.append(p)
        opt = components.table_optimizer
        if opt is not None:
            out += [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def host_groups_of(components: Any) -> list[Any]:
    """Groups meant for host tensors: the gloo row-gradient group of replicated host tables."""
    opt = components.table_optimizer
    if components.tables.host and not components.tables.sharded and opt is not None:
        return [opt.process_group]
    return []


# ---------------------------------------------------------------------------- frames

def _third_party(path: Path) -> bool:
    return "site-packages" in path.parts or "dist-packages" in path.parts


def _transparent(path: Path) -> bool:
    """torch, this package's testing helpers and the standard library: look further out for the caller."""
    return (path.is_relative_to(TORCH) or path.is_relative_to(TESTING) or path.is_relative_to(STDLIB)
            or not path.is_absolute())


def _our_frame() -> Any | None:
    """The frame of our code that made the call (engram_pretrain, a test, a script); None when the caller
    is third-party code (DeepSpeed, ...) between our code and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not _transparent(path):
            return None if _third_party(path) else frame
        frame = frame.f_back
    return None


def _site(frame: Any | None) -> str:
    if frame is None:
        return "<outside engram_pretrain>"
    path = Path(frame.f_code.co_filename)
    module = (".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
              if path.is_relative_to(PACKAGE) else path.name)
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{module}:{frame.f_code.co_name}: {line}"


def _innermost_site() -> str:
    """`module:function: line` of the innermost frame of our code (engram_pretrain first, else a test)."""
    frame, fallback = sys._getframe(1), None
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE) and not path.is_relative_to(TESTING):
            return _site(frame)
        if fallback is None and not _transparent(path) and not _third_party(path):
            fallback = frame
        frame = frame.f_back
    return _site(fallback)


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)


def _describe(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------------------- the mode

class DeviceStrictMode(TorchFunctionMode):
    """`with DeviceStrictMode(host_groups=[...]): ...`: placement bookkeeping and checks (see the module)."""

    def __init__(self, host_groups: Iterable[Any] = ()) -> None:
        super().__init__()
        self.host_groups = list(host_groups)
        for g in self.host_groups:
            if dist.get_backend(g) != "gloo":
                raise ValueError("host groups must be gloo groups")
        self.collectives_checked = 0
        """Collectives from engram_pretrain that passed the check (a test can see the guard worked)."""

    # -- placement of a device argument: True host, False device, None not given
    @staticmethod
    def _placement(device: Any) -> bool | None:
        if device is None:
            return None
        d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if d == STRICT_DEVICE or d.type != "cpu":
            return False
        return _our_frame() is not None  # third-party code's `cpu` is its accelerator on a CPU run

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if owner is torch.Tensor.device:  # the device a tensor reports
            return torch.device("cpu") if is_host(args[0]) else STRICT_DEVICE
        if name == "__get__":  # `.grad`, `.data`, `.T`, ... live where their tensor lives
            got = func(*args, **kwargs)
            if isinstance(got, torch.Tensor) and is_host(args[0]) and not is_host(got):
                setattr(got, _HOST, getattr(args[0], _HOST))
            return got
        if name == "to" or name == "cpu" or name == "pin_memory":
            return self._move(func, name, args, kwargs)
        if name in FACTORIES:
            return self._factory(func, name, args, kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        host = [t for t in inputs if is_host(t)]
        if host and name not in CROSSING:
            device = [t for t in inputs if not is_host(t)]
            wide = [t for t in host if t.dim() > 0]
            if wide and device:
                raise DeviceStrictError(
                    f"{name}: host tensor {_describe(wide[0])} (host since {getattr(wide[0], _HOST)}) mixed "
                    f"with training-device tensor {_describe(device[0])} at {_innermost_site()}")
        out = func(*args, **kwargs)
        if host and name not in CROSSING and len(host) == len(inputs):
            self._mark_outputs(out, getattr(host[0], _HOST))
        elif name == "__getitem__" and is_host(args[0]):  # an index of a host tensor is a host tensor
            self._mark_outputs(out, getattr(args[0], _HOST))
        return out

    @staticmethod
    def _mark_outputs(out: Any, origin: str) -> None:
        for t in _tensors(out):
            if not is_host(t):
                setattr(t, _HOST, origin)

    def _move(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        src = args[0]
        if name == "to":
            target = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else kwargs.get("other")
            if target is not None:
                host: bool | None = is_host(target)
                args = (src, torch.device("cpu"), *args[2:])
            else:
                device, _, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                host = self._placement(device)
                if device is not None:  # keep `.to` of the same device a no-op (cpu:0 would copy)
                    args, kwargs = self._plain_cpu(args, kwargs)
        else:
            host = True
        out = func(*args, **kwargs)
        now = is_host(src) if host is None else host
        if out is src and now != is_host(src):  # a fresh view carries the new placement; autograd flows
            out = src.view_as(src)
        if now and not is_host(out):
            moved = host is not None and not is_host(src)
            origin = f"{name}() at {_innermost_site()}" if moved else getattr(src, _HOST)
            setattr(out, _HOST, origin)
        return out

    @staticmethod
    def _plain_cpu(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        elif len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], torch.device("cpu"), *args[2:])
        return args, kwargs

    def _factory(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        host = self._placement(kwargs.get("device"))
        if host is None and name.startswith("new_"):
            host = is_host(args[0])
        elif host is None and inputs and name != "sparse_coo_tensor":
            host = is_host(inputs[0])
        elif host is None and name == "sparse_coo_tensor":
            placed = {is_host(t) for t in inputs}
            if len(placed) > 1:
                raise DeviceStrictError(f"sparse_coo_tensor: indices and values on different devices at "
                                        f"{_innermost_site()}")
            host = placed.pop() if placed else True
        elif host is None:
            host = True  # the default device is the host (also on a GPU machine)
        out = func(*args, **kwargs)
        if host:
            origin = f"{name}() at {_innermost_site()}"
            self._mark_outputs(out, origin)
        return out

    # -- collectives
    def check_collective(self, name: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
        frame = _our_frame()
        if frame is None:
            return
        bound = signature.bind_partial(*args, **kwargs)
        group = bound.arguments.get("group")
        tensors = list(_tensors(list(bound.arguments.values())))
        host = [t for t in tensors if is_host(t)]
        on_host_group = group is not None and any(group is g for g in self.host_groups)
        if host and not on_host_group:
            where = "the default group" if group is None else "a device group"
            raise DeviceStrictError(
                f"dist.{name} on {where} got host tensor {_describe(host[0])} (host since "
                f"{getattr(host[0], _HOST)}) at {_site(frame)}")
        if on_host_group and len(host) != len(tensors):
            raise DeviceStrictError(f"dist.{name} on a host group got a training-device tensor at "
                                    f"{_site(frame)}")
        self.collectives_checked += 1


@contextlib.contextmanager
def _patched_collectives(mode: DeviceStrictMode) -> Iterator[None]:
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Any) -> Any:
        signature = inspect.signature(fn)

        def checked(*args: Any, **kwargs: Any) -> Any:
            mode.check_collective(name, signature, args, kwargs)
            return fn(*args, **kwargs)

        return checked

    try:
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def _modes_in_custom_backward(modes: list[TorchFunctionMode]) -> Iterator[None]:
    """Python `autograd.Function.backward`s run under `modes` too (the engine calls them without)."""
    original = BackwardCFunction.apply

    def apply(self: Any, *args: Any) -> Any:
        active = torch.overrides._get_current_function_mode_stack()
        with contextlib.ExitStack() as stack:
            for m in modes:
                if not any(m is a for a in active):
                    stack.enter_context(m)
            return original(self, *args)

    BackwardCFunction.apply = apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        BackwardCFunction.apply = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _kernel_outputs_follow_inputs() -> Iterator[None]:
    """Compiled kernel ops (`kernels.dispatch`) are opaque to the mode: their tensor results are placed
    like their tensor inputs (the ops check that the inputs share a device, through `tensor.device`)."""
    from ..kernels import dispatch

    classes = [c for c in vars(dispatch).values() if isinstance(c, type) and issubclass(c, dispatch.TorchOps)]
    originals = [(c, n, f) for c in classes for n, f in list(vars(c).items())
                 if callable(f) and not n.startswith("_")]

    def wrap(fn: Any) -> Any:
        def placed(*args: Any, **kwargs: Any) -> Any:
            host = [t for t in _tensors(list(args) + list(kwargs.values())) if is_host(t)]
            out = fn(*args, **kwargs)
            if host:
                DeviceStrictMode._mark_outputs(out, getattr(host[0], _HOST))
            return out

        return placed

    try:
        for c, name, fn in originals:
            setattr(c, name, wrap(fn))
        yield
    finally:
        for c, name, fn in originals:
            setattr(c, name, fn)


class _DeviceSyncRecorder(HostSyncRecorder):
    """`HostSyncRecorder` that knows host tensors: reading one (`float(host_copy[0])`) is no GPU sync."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if args and isinstance(args[0], torch.Tensor) and is_host(args[0]):
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


class Strict:
    """What `device_strict` yields: the placement mode and the host-sync recorder of the block."""

    def __init__(self, mode: DeviceStrictMode, syncs: HostSyncRecorder) -> None:
        self.mode = mode
        self.recorder = syncs

    @property
    def sync_sites(self) -> set[str]:
        return set(self.recorder.sites)


@contextlib.contextmanager
def device_strict(host_groups: Iterable[Any] = (),
                  host_tensors: Iterable[torch.Tensor] = ()) -> Iterator[Strict]:
    """One strict context: placement checks (`DeviceStrictMode`) plus host-sync recording
    (`HostSyncRecorder`); `host_tensors` are marked as host first. Use on a trainer built inside
    `strict_training_device()`."""
    mark_host(host_tensors)
    mode, recorder = DeviceStrictMode(host_groups), _DeviceSyncRecorder()
    with (_patched_collectives(mode), _kernel_outputs_follow_inputs(),
          _modes_in_custom_backward([mode, recorder]), mode, recorder):
        yield Strict(mode, recorder)


@contextlib.contextmanager
def strict_training_device() -> Iterator[None]:
    """Within: `train.distributed.init_distributed` puts a CPU run on `STRICT_DEVICE`, so a trainer built
    here places its model, tables and batches on the strict device (build it, step it in `device_strict`)."""
    from ..train import distributed

    original = distributed.init_distributed

    def init(backend: str = "auto") -> Any:
        info = original(backend)
        if info.device.type == "cpu":
            info.device = STRICT_DEVICE
        return info

    distributed.init_distributed = init  # type: ignore[assignment]
    try:
        yield
    finally:
        distributed.init_distributed = original  # type: ignore[assignment]
