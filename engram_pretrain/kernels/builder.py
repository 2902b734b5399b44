"""Just-in-time builds of the custom ops (DeepSpeed op-builder style), never at import time.

`OpBuilder.load()` compiles the sources with `torch.utils.cpp_extension.load` into a cached build
directory `<cache>/<name>-<hash>` where the hash covers the source files, the compiler flags, the
torch/CUDA/Python versions and the compiler, so a changed source or a different torch never reuses a
stale binary and an unchanged one loads in about a second. The cache root is `$ENGRAM_OPS_CACHE`, else
`$XDG_CACHE_HOME/engram_pretrain/ops`, else `~/.cache/engram_pretrain/ops`. An exclusive file lock
serialises concurrent builds of the same op (e.g. several ranks starting together); a failed build
raises `OpBuildError` with the compiler output and leaves no partial module behind.

`compile_check_cuda()` compiles the plain-CUDA kernel source with standalone `nvcc -c` (no torch
headers, no GPU needed); a successful object is cached under the same hashing scheme.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
CPP_SOURCES = (KERNEL_DIR / "cpp" / "engram_cpu_ops.cpp",)
CUDA_KERNEL_SOURCE = KERNEL_DIR / "cuda" / "engram_ops.cu"
CUDA_HEADER = KERNEL_DIR / "cuda" / "engram_ops.h"
CHECKS_HEADER = KERNEL_DIR / "include" / "engram_checks.h"
"""Argument checks shared by the CPU ops and the CUDA binding."""
KERNELS_HEADER = KERNEL_DIR / "include" / "engram_kernels.h"
"""Per-element bodies and launch configurations shared by the CUDA kernels and their CPU emulation."""
BINDING_HEADER = KERNEL_DIR / "include" / "engram_binding.h"
"""Torch-facing ops over a launcher backend, shared by the CUDA binding and the emulation."""
CUDA_SOURCES = (KERNEL_DIR / "cuda" / "engram_ops_binding.cpp", CUDA_KERNEL_SOURCE)
EMULATION_SOURCES = (KERNEL_DIR / "emulation" / "engram_cuda_emulation.cpp",)
MAX_ERROR_CHARS = 6000
"""Compiler output kept in an OpBuildError (the tail, where the first errors usually are not, is
preceded by the failing command line; set verbose=True in load() for everything)."""
NVCC_CHECK_ARCHS = ("sm_90",)
"""Targets of the standalone compile check (Hopper; nvcc 13 also accepts sm_75 .. sm_121)."""


def cuda_arch_list() -> str:
    """The CUDA architectures a build targets, as `torch.utils.cpp_extension` picks them:
    `TORCH_CUDA_ARCH_LIST` when set, else the compute capabilities of the visible GPUs ("" without any).
    Part of the build key, so a cache made for one GPU is never loaded on another."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if not torch.cuda.is_available():
        return ""
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


class OpBuildError(RuntimeError):
    """A custom op could not be built or loaded (missing toolchain, compiler error)."""


def cache_root() -> Path:
    """Root of the build cache (see module docstring)."""
    env = os.environ.get("ENGRAM_OPS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "engram_pretrain" / "ops"


def cxx_compiler() -> str | None:
    """Path of the host C++ compiler torch will use, or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def nvcc_path() -> str | None:
    """Standalone nvcc: $CUDA_HOME/bin/nvcc, else nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _digest(paths: tuple[Path, ...], extra: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for item in extra:
        h.update(b"\0" + item.encode())
    return h.hexdigest()[:16]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class OpBuilder:
    """One JIT-built extension: name, sources and flags."""

    name: str
    sources: tuple[Path, ...]
    depends: tuple[Path, ...] = ()
    extra_cflags: tuple[str, ...] = ()
    extra_cuda_cflags: tuple[str, ...] = ()
    extra_ldflags: tuple[str, ...] = ()
    with_cuda: bool = False
    _module: ModuleType | None = field(default=None, init=False, repr=False)

    def compatibility(self) -> str | None:
        """None when this machine can build the op, else the reason it cannot."""
        from torch.utils import cpp_extension

        if cxx_compiler() is None:
            return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
        if not cpp_extension.is_ninja_available():
            return "ninja is not installed (pip install ninja)"
        if self.with_cuda:
            if torch.version.cuda is None:
                return f"torch {torch.__version__} is a CPU-only build"
            if cpp_extension.CUDA_HOME is None:
                return "CUDA toolkit not found (set CUDA_HOME)"
        return None

    def key(self) -> str:
        """Hash of sources, flags, toolchain and (CUDA builds) target architectures identifying one build."""
        extra = (
            torch.__version__, str(torch.version.cuda), sys.version, str(cxx_compiler()),
            *self.extra_cflags, "|", *self.extra_cuda_cflags, "|", *self.extra_ldflags,
            *(("|", cuda_arch_list()) if self.with_cuda else ()),
        )
        return _digest(self.sources + self.depends, extra)

    def build_dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.key()}"

    def load(self, verbose: bool = False) -> ModuleType:
        """Build (first time) or load the cached extension; raises OpBuildError on failure."""
        if self._module is not None:
            return self._module
        reason = self.compatibility()
        if reason is not None:
            raise OpBuildError(f"cannot build op '{self.name}': {reason}")
        from torch.utils import cpp_extension

        build_dir = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        module_name = f"{self.name}_{self.key()}"
        fresh = not any(build_dir.glob(f"{module_name}*.so"))
        if fresh:
            logger.info("building op '%s' in %s (one-time, about a minute)", self.name, build_dir)
        t0 = time.perf_counter()
        with _file_lock(build_dir.with_suffix(".lock")):
            try:
                module = cpp_extension.load(
                    name=module_name,
                    sources=[str(s) for s in self.sources],
                    extra_cflags=list(self.extra_cflags),
                    extra_cuda_cflags=list(self.extra_cuda_cflags) or None,
                    extra_ldflags=list(self.extra_ldflags),
                    extra_include_paths=[str(KERNEL_DIR / "include"),
                                         *([str(KERNEL_DIR / "cuda")] if self.with_cuda else [])],
                    build_directory=str(build_dir),
                    with_cuda=self.with_cuda,
                    verbose=verbose,
                )
            except Exception as exc:  # compiler errors surface as RuntimeError/CalledProcessError
                for stale in build_dir.glob(f"{module_name}*.so"):
                    stale.unlink(missing_ok=True)
                detail = str(exc)
                if len(detail) > MAX_ERROR_CHARS:
                    detail = "...\n" + detail[-MAX_ERROR_CHARS:]
                raise OpBuildError(
                    f"building op '{self.name}' failed in {build_dir}:\n{detail}\n"
                    f"Fix the toolchain or select the reference ops with backend='torch'."
                ) from None
        if fresh:
            logger.info("built op '%s' in %.1f s", self.name, time.perf_counter() - t0)
        self._module = module
        return module


CPU_BUILDER = OpBuilder(
    name="engram_cpu_ops",
    sources=CPP_SOURCES,
    depends=(CHECKS_HEADER,),
    extra_cflags=("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"),
    extra_ldflags=("-fopenmp",),
)
"""C++/OpenMP ops for host-resident tables (CPU tensors)."""

CUDA_BUILDER = OpBuilder(
    name="engram_cuda_ops",
    sources=CUDA_SOURCES,
    depends=(CUDA_HEADER, CHECKS_HEADER, KERNELS_HEADER, BINDING_HEADER),
    extra_cflags=("-O3",),
    extra_cuda_cflags=("-O3", "--fmad=false"),
    with_cuda=True,
)
"""CUDA ops (fused multi-head gather, sort + segment-reduce + fused row-sparse Adam)."""

EMULATION_BUILDER = OpBuilder(
    name="engram_cuda_emulation",
    sources=EMULATION_SOURCES,
    depends=(CHECKS_HEADER, KERNELS_HEADER, BINDING_HEADER),
    extra_cflags=("-O2", "-ffp-contract=off", "-fno-math-errno"),
)
"""The CUDA kernels' bodies and launch configurations run on the CPU, one (block, thread) after another
(tests: the CUDA index arithmetic and dtype paths against the reference). No FMA contraction, like
`--fmad=false`."""


def load_cpu_ops(verbose: bool = False) -> ModuleType:
    """The C++ CPU extension module (built on first call)."""
    return CPU_BUILDER.load(verbose)


def load_cuda_ops(verbose: bool = False) -> ModuleType:
    """The CUDA extension module (built on first call; needs a CUDA build of torch)."""
    return CUDA_BUILDER.load(verbose)


def load_emulated_cuda_ops(verbose: bool = False) -> ModuleType:
    """The CPU grid emulation of the CUDA kernels (built on first call; any C++ compiler)."""
    return EMULATION_BUILDER.load(verbose)


def nvcc_check_command(nvcc: str, source: Path, obj: Path, arch: str) -> list[str]:
    """Standalone compile of the plain-CUDA kernels (no torch headers)."""
    return [nvcc, "-c", "-std=c++17", "-O3", "--fmad=false", f"-arch={arch}", f"-I{source.parent}",
            f"-I{KERNELS_HEADER.parent}", str(source), "-o", str(obj)]


def compile_check_cuda(archs: tuple[str, ...] = NVCC_CHECK_ARCHS) -> list[Path]:
    """Compile engram_ops.cu (and the shared bodies it includes) with standalone nvcc for each arch;
    returns the object files.

    Raises OpBuildError when nvcc is missing or the compile fails (message holds nvcc's output).
    Objects are cached by source/nvcc hash, so the check costs about 20 s once per change.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise OpBuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    objs = []
    for arch in archs:
        flags = nvcc_check_command("", Path(), Path(), arch)
        key = _digest((CUDA_KERNEL_SOURCE, CUDA_HEADER, KERNELS_HEADER), (version, *flags))
        out_dir = cache_root() / f"nvcc-check-{key}"
        obj = out_dir / f"engram_ops.{arch}.o"
        with _file_lock(out_dir.with_suffix(".lock")):
            if not obj.exists():
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = obj.with_suffix(".tmp.o")
                cmd = nvcc_check_command(nvcc, CUDA_KERNEL_SOURCE, tmp, arch)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    raise OpBuildError(f"nvcc compile check failed ({' '.join(cmd)}):\n"
                                       f"{proc.stdout}{proc.stderr}")
                tmp.replace(obj)
        objs.append(obj)
    return objs


def syntax_check_cuda_binding() -> Path:
    """Compile-check (`-fsyntax-only`) the CUDA torch binding and the shared binding header against this
    torch's headers and the CUDA toolkit's runtime headers, without a CUDA build of torch or a GPU. A CPU
    build of torch ships the c10/cuda headers but not their generated `cuda_cmake_macros.h`, which an empty
    stand-in replaces. Returns the marker file of a passed check (cached by sources, torch, compiler).

    Raises OpBuildError when nvcc's toolkit or a C++ compiler is missing, or the check fails."""
    import sysconfig

    from torch.utils import cpp_extension

    nvcc, cxx = nvcc_path(), cxx_compiler()
    if nvcc is None or cxx is None:
        raise OpBuildError("the binding syntax check needs nvcc's toolkit (CUDA headers) and a C++ compiler")
    homes = [Path(h) for h in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda") if h]
    homes.insert(0, Path(nvcc).resolve().parent.parent)
    found = [h / "include" for h in homes if (h / "include" / "cuda_runtime.h").exists()]
    if not found:
        raise OpBuildError(f"cuda_runtime.h not found under {[str(h / 'include') for h in homes]}")
    cuda_include = found[0]
    sources = (CUDA_SOURCES[0], CUDA_HEADER, CHECKS_HEADER, KERNELS_HEADER, BINDING_HEADER)
    key = _digest(sources, (torch.__version__, cxx, str(cuda_include)))
    out_dir = cache_root() / f"binding-check-{key}"
    marker = out_dir / "ok"
    with _file_lock(out_dir.with_suffix(".lock")):
        if not marker.exists():
            stub = out_dir / "stub" / "c10" / "cuda" / "impl"
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
            includes = [f"-I{KERNEL_DIR / 'include'}", f"-I{KERNEL_DIR / 'cuda'}", "-isystem",
                        str(out_dir / "stub")]
            for path in (*cpp_extension.include_paths(), str(cuda_include), sysconfig.get_paths()["include"]):
                includes += ["-isystem", path]
            cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=engram_binding_check",
                   *includes, str(CUDA_SOURCES[0])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise OpBuildError(f"CUDA binding syntax check failed ({' '.join(cmd)}):\n"
                                   f"{proc.stdout}{proc.stderr}"[-MAX_ERROR_CHARS:])
            marker.write_text(" ".join(cmd))
    return marker
