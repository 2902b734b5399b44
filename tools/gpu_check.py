"""GPU check of the Engram CUDA ops (`make gpu-check`), a few minutes on a GPU machine (docs/kernels.md):

1. the standalone nvcc compile of the kernels and the syntax check of their torch binding;
2. the JIT build of the CUDA extension (cached afterwards);
3. the `gpu` tests: CUDA ops == reference, the CPU emulation == the CUDA kernels, device-table training on
   the CUDA ops without a host sync == the torch path;
4. a 2-step training run of a tiny MoE + Engram model on cuda in bf16 with parallel.kernel_backend=cuda.

Without a CUDA device or with a CPU build of torch it runs nothing and exits with status 2, saying so.
Usage: python tools/gpu_check.py [--skip-train] (PYTHON of a CUDA build of torch; the repo's .venv has the
CPU build: `make gpu-check GPU_PYTHON=/path/to/python`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_kernels.py", "tests/test_cuda_emulation.py", "tests/test_device_table_kernels.py"]
TINY_RUN = [
    "model.vocab_size=96", "model.hidden_size=64", "model.num_layers=3", "model.max_seq_len=64",
    "model.attention.num_heads=2", "model.moe.num_routed_experts=4", "model.moe.top_k=2",
    "model.moe.expert_dim=32", "model.moe.first_k_dense=1", "model.engram.layers=[1, 2]",
    "model.engram.num_heads=2", "model.engram.d_mem=32", "model.engram.base_table_size=[1009]",
    "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.steps=2",
    "schedule.warmup_steps=1",
    "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=0", "logging.tensorboard=false",
    "deepspeed.bf16=true", "parallel.kernel_backend=cuda",
]


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (use a CUDA build of torch: GPU_PYTHON=...)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def stage(name: str, fn: Callable[[], None], results: list[tuple[str, bool, float]]) -> bool:
    print(f"\n=== gpu-check: {name}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
        ok = True
    except Exception as exc:  # report every stage, then fail
        print(f"FAILED: {exc}", flush=True)
        ok = False
    results.append((name, ok, time.perf_counter() - t0))
    return ok


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, timeout=timeout, env=env)


def compile_checks() -> None:
    from engram_pretrain.kernels import builder

    print("nvcc objects:", builder.compile_check_cuda())
    print("binding check:", builder.syntax_check_cuda_binding())


def build_extension() -> None:
    from engram_pretrain.kernels import builder

    print("module:", builder.load_cuda_ops(verbose=True))


def gpu_tests() -> None:
    run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", *GPU_TESTS], timeout=900)


def tiny_training(*overrides: str) -> None:
    from engram_pretrain.testing.datasets import make_dataset_dir

    with tempfile.TemporaryDirectory(prefix="engram-gpu-check-") as tmp:
        data = make_dataset_dir(Path(tmp) / "ds", vocab_size=96, num_docs=(200, 20))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        run([sys.executable, "-m", "engram_pretrain.cli", "train", "tiny", *TINY_RUN, f"data.paths=[{data}]",
             f"output_dir={Path(tmp) / 'run'}", *overrides], timeout=600, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-train", action="store_true", help="skip the 2-step training run")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: nothing run: {reason}. Run `make gpu-check` on a machine with an NVIDIA GPU, a "
              "CUDA build of torch and the CUDA toolkit (CUDA_HOME).", file=sys.stderr)
        return 2
    import torch

    gpu = torch.cuda.get_device_name(0)
    print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) on {gpu}")
    results: list[tuple[str, bool, float]] = []
    ok = stage("nvcc compile check + binding syntax check", compile_checks, results)
    ok = stage("build the CUDA extension", build_extension, results) and ok
    ok = ok and stage("gpu tests (ops == reference, emulation == GPU, device tables)", gpu_tests, results)
    if not args.skip_train:
        name = "2-step bf16 training on cuda (parallel.kernel_backend=cuda)"
        ok = stage(name, tiny_training, results) and ok
    print("\n=== gpu-check summary")
    for name, passed, seconds in results:
        print(f"  {'ok  ' if passed else 'FAIL'} {seconds:7.1f} s  {name}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
