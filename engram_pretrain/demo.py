"""`make demo`: the main job end to end on one CPU machine.

1. Data: `data/default` (KJV Bible + Python stdlib, a 4096-token byte-level BPE), built exactly like
   `make data` when it is missing.
2. The unigram entropy of the train shards, H = -sum_v p(v) ln p(v) in nats/token from the token counts:
   the loss of the best predictor that ignores context, the bar the model must clear.
3. `configs/tiny.yaml` (MoE + mHC + Engram) trained with 2 processes under ZeRO-2 on gloo
   (`torchrun --standalone --nproc_per_node 2 -m engram_pretrain.cli train ...`) into `runs/demo/`.
4. `runs/demo/loss.png`: training and validation loss against the unigram entropy; a short summary.

Exit code 0 when the final validation loss is below the unigram entropy, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import REPO_ROOT


def unigram_entropy(dataset_dir: str | Path, split: str = "train") -> tuple[float, int]:
    """(entropy in nats/token of the token frequencies of `split`, number of tokens)."""
    from .data.dataset_dir import DatasetDir

    ds = DatasetDir(dataset_dir)
    counts = np.zeros(ds.vocab_size, dtype=np.int64)
    for shard in ds.split(split):
        counts += np.bincount(np.asarray(shard.tokens(), dtype=np.int64), minlength=ds.vocab_size)
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()), total


def ensure_data(path: Path) -> None:
    """Build the default dataset with `make data OUT=<path>` unless it is complete (without make: the same
    `python -m data_prep build` command with the Makefile's defaults)."""
    if (path / "metadata.json").is_file():
        print(f"data: {path} (complete)")
        return
    print(f"data: {path} missing: building it (default corpus, BPE vocab 4096)", flush=True)
    if shutil.which("make") and (REPO_ROOT / "Makefile").is_file():
        cmd = ["make", "--no-print-directory", "data", f"OUT={path}"]
    else:
        cmd = [sys.executable, "-m", "data_prep", "build", "default", "--out", str(path),
               "--tokenizer", "bpe", "--vocab-size", "4096"]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss points, validation loss points) from metrics.jsonl."""
    train, val = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get("loss"), float):
            train.append((rec["step"], rec["loss"]))
        if isinstance(rec.get("val_loss"), float):
            val.append((rec["step"], rec["val_loss"]))
    return train, val


def plot(train: list[tuple[int, float]], val: list[tuple[int, float]], entropy: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="tab:orange")
    ax.axhline(entropy, ls="--", color="gray", label=f"unigram entropy {entropy:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny MoE + mHC + Engram, 2 CPU processes, ZeRO-2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engram_pretrain.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/default", help="dataset directory (built if missing)")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="runs/demo", help="run directory (replaced)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args(argv)

    data = (REPO_ROOT / args.data).resolve() if not Path(args.data).is_absolute() else Path(args.data)
    out = (REPO_ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    ensure_data(data)
    entropy, num_tokens = unigram_entropy(data)
    print(f"unigram entropy of the train split: {entropy:.4f} nats/token ({entropy / math.log(2):.3f} bits) "
          f"over {num_tokens:,} tokens", flush=True)

    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "engram_pretrain.cli", "train", args.config, f"data.paths=[{data}]", f"output_dir={out}",
           f"deepspeed.zero_stage={args.zero_stage}", *args.overrides, "--resume", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    print("train:", " ".join(cmd[2:]), flush=True)
    start = time.time()
    rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode
    seconds = time.time() - start
    if rc != 0:
        print(f"training failed with exit code {rc}", file=sys.stderr)
        return rc

    from .train.checkpoint import find_latest

    train, val = read_metrics(out / "metrics.jsonl")
    plot(train, val, entropy, out / "loss.png")
    ckpt = find_latest(out / "checkpoints")
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt else 0
    final_val = val[-1][1] if val else math.nan
    ok = final_val < entropy
    print("\ndemo summary")
    print(f"  data              {data} ({num_tokens:,} train tokens)")
    print(f"  unigram entropy   {entropy:.3f} nats/token")
    print(f"  final train loss  {train[-1][1]:.3f} nats/token (step {train[-1][0]})" if train else "")
    print(f"  final val loss    {final_val:.3f} nats/token ({final_val / entropy:.0%} of the unigram "
          "entropy)")
    print(f"  training          {args.nproc} processes, ZeRO-{args.zero_stage}, {seconds:.0f} s wall "
          "(launch included)")
    print(f"  checkpoint        {ckpt} ({size / 1e6:.1f} MB)")
    print(f"  loss plot         {out / 'loss.png'}")
    print(f"  result            {'OK: below' if ok else 'NOT below'} the unigram entropy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
