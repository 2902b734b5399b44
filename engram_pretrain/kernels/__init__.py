"""Custom Engram ops behind one dispatch: torch reference (the oracle), C++/OpenMP CPU ops, CUDA ops.

Nothing is compiled at import time; `get_ops("auto" | "cuda" | "cpp" | "torch")` builds the
extension a backend needs on first use (cached, see `builder`). See docs/kernels.md.
"""

from . import reference
from .builder import OpBuildError, cache_root, compile_check_cuda, load_cpu_ops, load_cuda_ops
from .dispatch import BACKENDS, AutoOps, Backend, ExtensionOps, TorchOps, empty_rows, get_ops

__all__ = [
    "BACKENDS",
    "AutoOps",
    "Backend",
    "ExtensionOps",
    "OpBuildError",
    "TorchOps",
    "cache_root",
    "compile_check_cuda",
    "empty_rows",
    "get_ops",
    "load_cpu_ops",
    "load_cuda_ops",
    "reference",
]
