"""`engram-pretrain export <checkpoint> <out_dir>`: a training checkpoint -> a Hugging Face folder;
`engram-pretrain import <hf_dir> <run_dir>`: an exported folder -> a run to continue pretraining."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator
from pathlib import Path

import torch


def _stream(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the state dict entry by entry, dropping each once handed out (one copy in memory at most)."""
    for name in list(state):
        yield name, state.pop(name)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, data: str | Path | None = None,
                      max_shard_size: str = "2GB") -> Path:
    """Consolidate a checkpoint (ZeRO partitions, expert shards, table row ranges) into an HF folder.

    `data` is the dataset directory whose tokenizer and compression map the model was trained with;
    by default the first of the checkpoint config's `data.paths`.
    """
    from ..config import from_dict, read_yaml_tree
    from ..data.dataset_dir import DatasetDir
    from ..memory.addressing_builder import build_addressing
    from ..model.config import ModelConfig
    from ..train.checkpoint import checkpoint_state_dict, resolve_checkpoint
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
    state = checkpoint_state_dict(step)  # router biases included
    cmap_path = dataset.path / "compression_map.npz" if compression is not None else None
    return export_tensors(_stream(state), cfg, addressing, dataset.tokenizer_dir,
                          cmap_path, out_dir, max_shard_size=max_shard_size)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir, args.data, args.max_shard_size)
    print(f"exported {args.checkpoint} -> {out}\n"
          f"load: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")
    return 0


def import_folder(hf_dir: str | Path, run_dir: str | Path, config: str | None = None,
                  data: list[str] | None = None, overrides: list[str] | None = None,
                  write_checkpoint: bool = True) -> Path:
    """Turn an exported folder into a run directory for continued pretraining; returns its config path.

    `run_dir/config.yaml` is `config` (a preset or YAML; default: the built-in defaults) with `overrides`,
    the folder's model section, `output_dir=run_dir` and `checkpoint.init_from=hf_dir`. With
    `write_checkpoint`, a single process also writes the training checkpoint `run_dir/checkpoints/step_0`
    (weights, router biases, tables; fresh optimizer state), which `engram-pretrain train` resumes in the
    same layout; a run on more ranks, with expert parallelism or another ZeRO stage loads `init_from`
    instead (step 0 holds nothing else). Without it (or for a model that does not fit one process), the
    first `train` loads the weights itself.
    """
    from ..config import ConfigError, RunConfig, dump_config, load_config, load_preset
    from .importer import read_hf_config

    hf_dir, run_dir = Path(hf_dir).absolute(), Path(run_dir)
    model_keys = [o.split("=", 1)[0] for o in overrides or [] if o.strip().startswith("model.")]
    if model_keys:
        raise ConfigError(f"{model_keys[0]}: the model comes from {hf_dir}/config.json; edit the run's "
                          "config.yaml after the import (settings that change no tensor may differ)")
    model_cfg, _ = read_hf_config(hf_dir)  # weights are read once, by the trainer's init_from
    cfg: RunConfig = load_preset(config, overrides) if config else load_config(None, overrides)
    cfg.model = model_cfg
    cfg.output_dir = str(run_dir)
    cfg.checkpoint.init_from = str(hf_dir)
    if not config:
        cfg.name = run_dir.name
    if data:
        cfg.data.paths = list(data)
    cfg.validate()
    if write_checkpoint and not cfg.data.paths:
        raise ConfigError("data.paths: empty; pass --data <dataset dir> (the run's training data, whose "
                          "tokenizer the model uses)")
    if (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} already holds a run (config.yaml); choose a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    if write_checkpoint:
        import torch.distributed as dist

        from ..train.loop import build_trainer, setup_logging

        setup_logging(0)
        one_process = copy.deepcopy(cfg)  # step_0 is written by this one process; a run in another layout
        one_process.parallel.ep_size = 1  # (world size, ep_size, ZeRO stage) loads init_from instead
        trainer = build_trainer(one_process, resume="none")
        try:
            trainer.save()
        finally:
            if trainer.sink is not None:
                trainer.sink.close()
            if dist.is_initialized():
                dist.destroy_process_group()
    path = run_dir / "config.yaml"
    dump_config(cfg, path)  # last: a run directory with config.yaml is a finished import
    return path


def cmd_import(args: argparse.Namespace) -> int:
    path = import_folder(args.hf_dir, args.run_dir, args.config, args.data, args.overrides,
                         write_checkpoint=not args.no_checkpoint)
    print(f"imported {args.hf_dir} -> {args.run_dir}\ncontinue pretraining: engram-pretrain train {path}")
    return 0


def cmd_check_export(args: argparse.Namespace) -> int:
    from .modeling_engram_moe import check_export_folder

    check_export_folder(args.hf_dir)  # ExportFolderError is a ValueError: main prints it, exits 2
    print(f"{args.hf_dir}: config, weight shards and tokenizer OK")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `export`, `import`, `check-export` and `eval`."""
    p = sub.add_parser("export", help="export a training checkpoint as a Hugging Face folder")
    p.add_argument("checkpoint", help="step_<N>/ directory, checkpoint directory or run directory")
    p.add_argument("out_dir", help="new (or empty) output folder")
    p.add_argument("--data", help="dataset directory of the tokenizer/compression map "
                                  "(default: the checkpoint config's first data.paths entry)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="turn an exported Hugging Face folder into a run for continued "
                                      "pretraining (config + step_0 training checkpoint)")
    p.add_argument("hf_dir", help="folder written by `engram-pretrain export`")
    p.add_argument("run_dir", help="new run directory (output_dir of the continued run)")
    p.add_argument("--config", help="preset or YAML with the training settings (data, optimizer, schedule, "
                                    "DeepSpeed); its model section is replaced by the folder's")
    p.add_argument("--data", action="append", default=None, help="dataset directory (repeatable; default: "
                                                                 "the config's data.paths)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="only write config.yaml (checkpoint.init_from): the first `train` loads the weights")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the training settings (after the "
                                                "options: argparse does not interleave them)")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("check-export", help="check that an exported folder loads (config, every weight "
                                            "shard, tokenizer); names the file at fault")
    p.add_argument("hf_dir", help="folder written by `engram-pretrain export`")
    p.set_defaults(func=cmd_check_export)
    from .evaluate import add_command as add_eval_command

    add_eval_command(sub)
