"""Lookup bytes exchanged by row-sharded Engram tables with and without deduplication on real text (issue 5).

Takes the tiny preset's Engram layers (configs/tiny.yaml: layers 1 and 3, 2-grams + 3-grams x 4 heads,
prime head tables near 20011 rows, rows of d_mem / 8 = 8 fp32) and the default dataset (`make data` ->
data/default: KJV Bible + Python stdlib, BPE 4096), draws each simulated rank's micro-batches with the
trainer's own loader (8 x 128 tokens per rank), hashes them with the trainer's addressing, and counts for
every rank what a lookup sends to the other shard owners under `parallel.table_shard`'s contiguous row
ranges:

- without dedup: every looked-up id whose row another rank owns;
- with dedup (what `ShardedTable` does): every *distinct* such id of the micro-batch.

Each id that crosses costs the id (8 B) plus its row back (dim x 4 B) in forward and its gradient row (dim x
4 B) in backward. No collective runs: the counts come from `request_counts` (the same bucketing the
table uses, checked against the real exchange in tests/test_table_sharding.py). `--random` adds the same
counts for uniformly random tokens, to show how much of the saving comes from the text's repetitions.

Usage (repo root): python -m benchmarks.lookup_dedup [--data data/default] [--worlds 2 3 4] [--steps 20]
                  [--micro-batch-size 8] [--seq-len 128] [--random]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engram_pretrain.config import load_config
from engram_pretrain.data.loader import build_loaders
from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.model.addressing import EngramAddresser
from engram_pretrain.parallel.table_shard import request_counts, shard_bounds

ID_BYTES, ROW_ITEM_BYTES = 8, 4


def layer_offsets(addresser: EngramAddresser) -> dict[int, torch.Tensor]:
    """{layer: head offsets [H]} of each layer's flat table (as `EngramModule` adds them)."""
    out = {}
    for layer in addresser.layers:
        sizes = torch.tensor(addresser.head_sizes(layer), dtype=torch.int64)
        out[layer] = torch.cumsum(sizes, 0) - sizes
    return out


def count(batches: list[list[torch.Tensor]], addresser: EngramAddresser, world: int,
          dim: int) -> dict[str, float]:
    """Mean per rank and micro-batch: ids looked up, ids crossing ranks (no dedup / dedup), bytes."""
    offsets = layer_offsets(addresser)
    totals = {"ids": 0, "unique": 0, "cross": 0, "cross_dedup": 0}
    for rank, rank_batches in enumerate(batches):
        for input_ids in rank_batches:
            for layer, rows in addresser.row_ids(input_ids).items():
                flat = (rows + offsets[layer]).reshape(-1)
                bounds = shard_bounds(sum(addresser.head_sizes(layer)), world)
                plain = request_counts(flat, bounds, dedup=False)
                dedup = request_counts(flat, bounds, dedup=True)
                totals["ids"] += int(plain.sum())
                totals["unique"] += int(dedup.sum())
                totals["cross"] += int(plain.sum() - plain[rank])
                totals["cross_dedup"] += int(dedup.sum() - dedup[rank])
    n = sum(len(b) for b in batches)
    per_id = ID_BYTES + 2 * dim * ROW_ITEM_BYTES
    out = {k: v / n for k, v in totals.items()}
    out["bytes"] = out["cross"] * per_id
    out["bytes_dedup"] = out["cross_dedup"] * per_id
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--data", default="data/default", help="dataset directory (make data)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--steps", type=int, default=20, help="micro-batches per simulated rank")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="override the preset's (8)")
    ap.add_argument("--seq-len", type=int, default=None, help="override the preset's (128)")
    ap.add_argument("--random", action="store_true", help="also count uniformly random tokens")
    args = ap.parse_args()
    overrides = [f"data.paths=[{args.data}]", "train.eval_interval=0"]
    if args.micro_batch_size:
        overrides.append(f"train.micro_batch_size={args.micro_batch_size}")
    if args.seq_len:
        overrides += [f"data.seq_len={args.seq_len}", f"model.max_seq_len={max(args.seq_len, 256)}"]
    if not (Path(args.data) / "metadata.json").is_file():
        raise SystemExit(f"{args.data}: no dataset; build it with `make data` (python -m data_prep build)")
    cfg = load_config(args.config, overrides)
    e = cfg.model.engram
    _, _, dataset = build_loaders(cfg, 0, 1)
    addresser = EngramAddresser(build_addressing(cfg.model, dataset.compression_map()), e.max_ngram,
                                e.num_heads)
    heads = (e.max_ngram - 1) * e.num_heads
    dim = e.d_mem // heads
    print(f"{args.config}: Engram layers {list(e.layers)}, {heads} heads with rows "
          f"{addresser.head_sizes(e.layers[0])} (layer {e.layers[0]}), row dim {dim} fp32; {args.data}; "
          f"{args.steps} micro-batches of {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens per rank")
    print(f"bytes per crossing id: {ID_BYTES} (id) + {dim * ROW_ITEM_BYTES} (row) + {dim * ROW_ITEM_BYTES} "
          "(gradient row); per rank and micro-batch, all Engram layers together\n")
    header = (f"{'tokens':<8}{'W':>3}{'ids looked up':>15}{'distinct':>10}{'crossing':>10}"
              f"{'crossing dedup':>16}{'KB':>9}{'KB dedup':>10}{'saved':>8}")
    print(header)
    kinds = ["text", "random"] if args.random else ["text"]
    for kind in kinds:
        for world in args.worlds:
            batches = []
            for rank in range(world):
                loader, _, _ = build_loaders(cfg, rank, world)
                rank_batches = [next(loader)["input_ids"] for _ in range(args.steps)]
                if kind == "random":
                    gen = torch.Generator().manual_seed(rank)
                    rank_batches = [torch.randint(0, cfg.model.vocab_size, b.shape, generator=gen)
                                    for b in rank_batches]
                batches.append(rank_batches)
            c = count(batches, addresser, world, dim)
            saved = 1.0 - c["bytes_dedup"] / c["bytes"]
            print(f"{kind:<8}{world:>3}{c['ids']:>15,.0f}{c['unique']:>10,.0f}{c['cross']:>10,.0f}"
                  f"{c['cross_dedup']:>16,.0f}{c['bytes'] / 1e3:>9.1f}{c['bytes_dedup'] / 1e3:>10.1f}"
                  f"{saved:>8.1%}")


if __name__ == "__main__":
    main()
