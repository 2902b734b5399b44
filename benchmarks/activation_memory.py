"""Activation recompute: bytes saved for the backward per micro-batch and forward+backward time, with
`train.activation_checkpointing` none vs full vs selective, one process, CPU.

Saved bytes: `model.recompute.measure_saved_activations` (distinct storages autograd keeps, parameters
excluded, plus the inputs full-recomputed blocks keep). Times: median of `--reps` forward+backward passes
per mode, the modes in rotating order.

Usage (repo root): python -m benchmarks.activation_memory [--reps 5] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import print_table
from engram_pretrain.config import load_preset
from engram_pretrain.model.recompute import measure_saved_activations
from engram_pretrain.train.engine import build_model

MODES = ("none", "full", "selective")
CONFIGS = {
    "tiny": ("tiny", []),
    "proxy-engram": ("proxy-engram", []),
    "d512": ("tiny", ["model.hidden_size=512", "model.attention.num_heads=8", "model.moe.expert_dim=512",
                      "model.engram.d_mem=512"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for label, (preset, overrides) in CONFIGS.items():
        cfg = load_preset(preset, [*overrides, "model.engram.token_compression=false"])
        seq = cfg.data.seq_len
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.model.vocab_size, (args.batch, seq), generator=gen)
        models = {}
        for mode in MODES:
            cfg.train.activation_checkpointing = mode
            models[mode] = build_model(cfg, None)[0].train()
        nbytes = {}
        for mode, m in models.items():
            nbytes[mode] = measure_saved_activations(m, ids)
            m.zero_grad(set_to_none=True)
        times: dict[str, list[float]] = {m: [] for m in models}
        for r in range(args.reps + 1):
            for mode in MODES[r % 3:] + MODES[:r % 3]:
                t0 = time.perf_counter()
                models[mode](ids, labels=ids.roll(-1, 1)).loss.backward()
                models[mode].zero_grad(set_to_none=True)
                if r:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        row = [label, f"{args.batch}x{seq}"]
        for mode in MODES:
            row += [f"{nbytes[mode] / 2**20:.1f}", f"{nbytes[mode] / nbytes['none']:.3f}"]
        for mode in MODES:
            row += [f"{med[mode] * 1e3:.0f}"] + ([f"{med[mode] / med['none']:.2f}"] if mode != "none" else [])
        rows.append(row)
    print_table(["config", "tokens", "MiB none", "ratio", "MiB full", "ratio", "MiB selective", "ratio",
                 "ms none", "ms full", "ratio", "ms selective", "ratio"], rows)


if __name__ == "__main__":
    main()
