"""Host-sync guard for the CPU test suite: records the tensor calls that make a GPU wait for the host.

On a GPU, `.item()`, `.tolist()`, `bool/float/int(tensor)`, `.cpu()`, `.numpy()` and `.to("cpu")` block
until the device has caught up (`torch.cuda.set_sync_debug_mode` reports them there). On a CPU they cost
nothing, so nothing would notice a new one. `HostSyncRecorder` (a `TorchFunctionMode`) records each such
call under the innermost `engram_pretrain` frame that led to it, as `module:function: source line` (a call
inside DeepSpeed or torch is charged to our line that called into it), so a test can pin the sync sites
of a training step and fail on a new one. A CPU run cannot tell a host tensor from a device tensor, so a
`float()` of a tensor already copied to the host is listed too.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from torch.overrides import TorchFunctionMode

SYNC_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
PACKAGE = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()


def _is_host_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """`.to("cpu")` written as such (a `.to(device)` cannot be told from a device copy on a CPU run)."""
    if name != "to":
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return target == "cpu"


class HostSyncRecorder(TorchFunctionMode):
    """`with HostSyncRecorder() as rec: ...` -> `rec.sites`: Counter of "module:function: line" -> calls."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS or _is_host_copy(name, args, kwargs):
            self.sites[self._site()] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()):
            path = Path(frame.filename).resolve()
            if path.parent != THIS.parent and PACKAGE in path.parents:  # not the testing helpers
                module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                return f"{module}:{frame.name}: {(frame.line or '').strip()}"
        return "<outside engram_pretrain>"
