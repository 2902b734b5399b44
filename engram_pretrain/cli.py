"""`engram-pretrain <command>`: the user entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import PRESET_DIR, ConfigError, load_preset

__all__ = ["PRESET_DIR", "build_parser", "main"]


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def cmd_params(args: argparse.Namespace) -> int:
    from .analysis.params import count_parameters

    cfg = load_preset(args.config, args.overrides)
    c = count_parameters(cfg.model)
    rows = [
        ("total", c.total),
        ("activated (w/o embedding and LM head)", c.activated),
        ("activated (w/o embedding, with LM head)", c.activated_with_head),
        ("engram (tables + projections)", c.engram),
        ("  engram tables", c.engram_tables),
        ("routed experts (all)", c.routed_experts),
        ("sparse (total - activated, w/o embedding and head)", c.sparse),
        ("token embedding", c.embedding),
        ("LM head", c.lm_head),
    ]
    print(f"{cfg.name}: {cfg.model.num_layers} layers, d={cfg.model.hidden_size}")
    width = max(len(r[0]) for r in rows)
    for label, n in rows:
        print(f"  {label:<{width}}  {_fmt(n):>9}  ({n:,})")
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import to_dict

    print(yaml.safe_dump(to_dict(load_preset(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import run_training

    cfg = load_preset(args.config, args.overrides)
    resume = cfg.checkpoint.resume if args.resume is None else args.resume
    return run_training(cfg, resume=resume)


def cmd_config_docs(args: argparse.Namespace) -> int:
    from .config_docs import render_reference

    text = render_reference()
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-pretrain", description=__doc__)
    # The deepspeed launcher passes --local_rank=N right after the module name (LOCAL_RANK is also set).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="preset name (configs/<name>.yaml) or YAML path")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
        return p

    with_config("params", "count total / activated / Engram parameters on the meta device").set_defaults(
        func=cmd_params)
    with_config("show-config", "print the resolved config as YAML").set_defaults(func=cmd_show_config)
    p = with_config("train", "train (one process per rank: run under torchrun / deepspeed, or alone)")
    p.add_argument("--resume", default=None, help="auto (latest complete checkpoint, if any) | PATH | none; "
                   "default: checkpoint.resume")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("config-docs", help="render the config reference Markdown")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_config_docs)
    from .launch.commands import add_commands

    add_commands(sub)  # launch (one machine), submit (SLURM)
    from .analysis.commands import add_commands as add_analysis_commands
    add_analysis_commands(sub)  # analyze cka, analyze logit-lens
    from .export.commands import add_commands as add_export_commands

    add_export_commands(sub)  # export <checkpoint> <out_dir>, import <hf_dir> <run_dir>
    from .experiments.commands import add_commands as add_experiment_commands
    add_experiment_commands(sub)  # experiment ablation, experiment allocation
    from .planning.commands import add_commands as add_plan_commands
    add_plan_commands(sub)  # plan <config> --nodes N --gpus-per-node G --gpu h100
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # user errors: bad paths, incompatible inputs
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
