"""Activation recompute: bytes saved for the backward per micro-batch and forward+backward time, with
`train.activation_checkpointing` none vs full, one process, CPU.

Saved bytes are counted by `torch.autograd.graph.saved_tensors_hooks` during the forward (each storage
once). Times: median of `--reps` forward+backward passes per mode, the modes interleaved.

Usage (repo root): python -m benchmarks.activation_memory [--reps 5] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import print_table
from engram_pretrain.config import load_preset
from engram_pretrain.train.engine import build_model

CONFIGS = {
    "tiny": ("tiny", []),
    "proxy-engram": ("proxy-engram", []),
    "d512": ("tiny", ["model.hidden_size=512", "model.attention.num_heads=8", "model.moe.expert_dim=512",
                      "model.engram.d_mem=512"]),
}


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


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
        for mode in ("none", "full"):
            cfg.train.activation_checkpointing = mode
            models[mode] = build_model(cfg, None)[0].train()
        nbytes = {mode: saved_bytes(m, ids) for mode, m in models.items()}
        times: dict[str, list[float]] = {m: [] for m in models}
        for r in range(args.reps + 1):
            for mode in (("none", "full") if r % 2 == 0 else ("full", "none")):
                t0 = time.perf_counter()
                models[mode](ids, labels=ids.roll(-1, 1)).loss.backward()
                models[mode].zero_grad(set_to_none=True)
                if r:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        mib = {m: f"{b / 2**20:.1f}" for m, b in nbytes.items()}
        ms = {m: f"{t * 1e3:.0f}" for m, t in med.items()}
        ratio = nbytes["full"] / nbytes["none"]
        rows.append([label, f"{args.batch}x{seq}", mib["none"], mib["full"], f"{ratio:.3f}",
                     ms["none"], ms["full"], f"{med['full'] / med['none']:.2f}"])
    print_table(["config", "tokens", "saved MiB none", "saved MiB full", "ratio", "fwd+bwd ms none",
                 "fwd+bwd ms full", "time ratio"], rows)


if __name__ == "__main__":
    main()
