"""`engram-pretrain export <checkpoint> <out_dir>`: a training checkpoint -> a Hugging Face folder."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch


def _stream(state: dict[str, torch.Tensor], biases: list[torch.Tensor] | None,
            moe_bias_names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the state dict entry by entry, dropping each once handed out (one copy in memory at most)."""
    if biases is not None:
        for name, bias in zip(moe_bias_names, biases, strict=True):
            state[name] = bias.float()
    for name in list(state):
        yield name, state.pop(name)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, data: str | Path | None = None,
                      max_shard_size: str = "2GB") -> Path:
    """Consolidate a checkpoint (ZeRO partitions, expert shards, table row ranges) into an HF folder.

    `data` is the dataset directory whose tokenizer and compression map the model was trained with;
    by default the first of the checkpoint config's `data.paths`.
    """
    from ..analysis.hidden import checkpoint_state_dict, resolve_checkpoint
    from ..config import from_dict, read_yaml_tree
    from ..data.dataset_dir import DatasetDir
    from ..memory.addressing import build_addressing
    from ..model.config import ModelConfig
    from .exporter import export_tensors

    step = resolve_checkpoint(checkpoint)
    if step is None:
        raise ValueError(f"{checkpoint}: no complete training checkpoint (step_<N>/ with a 'complete' "
                         "marker), checkpoint directory or run directory holding one")
    tree = read_yaml_tree(step / "config.yaml")
    cfg = from_dict(ModelConfig, tree.get("model", {}), "model.")
    if data is None:
        paths = tree.get("data", {}).get("paths") or []
        if not paths:
            raise ValueError(f"{step}/config.yaml names no data.paths; pass --data <dataset dir>")
        data = paths[0]
    dataset = DatasetDir(data)
    compression = dataset.compression_map() if cfg.engram.layers and cfg.engram.token_compression else None
    addressing = build_addressing(cfg, compression) if cfg.engram.layers else None
    state = checkpoint_state_dict(step)
    biases = None
    if (step / "buffers.pt").is_file():
        biases = torch.load(step / "buffers.pt", map_location="cpu", weights_only=True)["moe_expert_bias"]
    bias_names = [f"blocks.{i}.ffn.router.expert_bias" for i in range(cfg.moe.first_k_dense, cfg.num_layers)]
    cmap_path = dataset.path / "compression_map.npz" if compression is not None else None
    return export_tensors(_stream(state, biases, bias_names), cfg, addressing, dataset.tokenizer_dir,
                          cmap_path, out_dir, max_shard_size=max_shard_size)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir, args.data, args.max_shard_size)
    print(f"exported {args.checkpoint} -> {out}\n"
          f"load: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `export`."""
    p = sub.add_parser("export", help="export a training checkpoint as a Hugging Face folder")
    p.add_argument("checkpoint", help="step_<N>/ directory, checkpoint directory or run directory")
    p.add_argument("out_dir", help="new (or empty) output folder")
    p.add_argument("--data", help="dataset directory of the tokenizer/compression map "
                                  "(default: the checkpoint config's first data.paths entry)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.set_defaults(func=cmd_export)
