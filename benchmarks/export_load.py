"""Loading a ~1 GB export: wall time and peak RSS of three ways to load it, each in a fresh process.

- eager: `engram_pretrain.export.importer.load_model` (reads every tensor, builds `EngramMoEModel(cfg)` with
  a random init, then `load_state_dict`): what loading without meta-device init costs;
- from_pretrained: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (meta-device init,
  weights materialised once from the shards);
- device_map=auto: the same with `max_memory={"cpu": half the weights}` and an offload folder
  (accelerate's dispatch; offloaded blocks and Engram tables stay on disk until their forward).

Usage (repo root): python -m benchmarks.export_load [--out DIR] [--table-rows 200000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

LOADERS = ("eager", "from_pretrained", "device_map=auto")

CHILD = r'''
import json, resource, sys, tempfile, time
import torch
out, how = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if how == "eager":
    from engram_pretrain.export.importer import load_model
    model = load_model(out)
else:
    from transformers import AutoModelForCausalLM
    kw = {}
    if how == "device_map=auto":
        size = json.load(open(out + "/model.safetensors.index.json"))["metadata"]["total_size"]
        kw = dict(device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tempfile.mkdtemp())
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kw)
seconds = time.perf_counter() - t0
with torch.no_grad():
    model(torch.randint(0, 200, (1, 16)))
rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**30
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak,
                  "rss_gb": rss}))
'''


def build_export(out: Path, table_rows: int) -> int:
    """A ~1 GB fp32 export (two Engram layers with large tables); returns its weight bytes."""
    import torch

    from engram_pretrain.export.exporter import export_model
    from engram_pretrain.memory.addressing_builder import build_addressing
    from engram_pretrain.model.config import ModelConfig
    from engram_pretrain.model.transformer import EngramMoEModel

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["engram memory " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")
    tok_dir = out.parent / "tokenizer"
    fast.save_pretrained(tok_dir)
    cfg = ModelConfig(vocab_size=len(fast), hidden_size=512, num_layers=4, max_seq_len=128)
    cfg.moe.num_routed_experts, cfg.moe.top_k, cfg.moe.expert_dim = 8, 2, 1024
    e = cfg.engram
    e.layers, e.num_heads, e.d_mem = [1, 3], 8, 512
    e.base_table_size = [table_rows, table_rows + 1000]
    e.pad_token_id, e.token_compression = fast.pad_token_id, False
    addressing = build_addressing(cfg, None)
    with torch.no_grad():
        model = EngramMoEModel(cfg, addressing)
    export_model(model, addressing, tok_dir, None, out, max_shard_size="500MB")
    return json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--table-rows", type=int, default=200_000, help="base rows of each n-gram order's heads")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="export-load-"))
    export = work / "export"
    size = build_export(export, args.table_rows)
    print(f"export: {export} ({size / 1e9:.2f} GB of weights)")
    rows = {}
    for how in LOADERS:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(export), how], capture_output=True, text=True,
                              check=True)
        rows[how] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = rows["eager"]
    print(f"{'loader':18s} {'seconds':>8s} {'peak RSS GB':>12s} {'peak / weights':>15s} {'vs eager':>9s} "
          f"{'RSS after GB':>13s}")
    for how, r in rows.items():
        ratio = r['peak_rss_gb'] * 2**30 / size
        print(f"{how:18s} {r['seconds']:8.2f} {r['peak_rss_gb']:12.2f} {ratio:15.2f} "
              f"{r['peak_rss_gb'] / base['peak_rss_gb']:9.2f} {r['rss_gb']:13.2f}")
    print("(RSS counts the memory-mapped shard pages a loader touched; 'after' is after one forward)")


if __name__ == "__main__":
    main()
