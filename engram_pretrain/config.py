"""The run configuration: one typed dataclass tree, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/tiny.yaml", ["model.num_layers=4", "optimizer.lr=3e-4"])

A YAML file may name a `base:` file (relative to itself) whose values it overrides. Unknown keys,
wrong types and inconsistent values raise `ConfigError` naming the dotted key before any work starts.
Every field carries a docstring right below it; `engram_pretrain.config_docs` renders them into
`docs/config_reference.md`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository: presets (`configs/`), DeepSpeed configs, launchers and task files live under it."""
PRESET_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the key."""


@dataclass
class DataConfig:
    """Training data: Megatron-format indexed datasets (`.bin` + `.idx`) written by `data_prep`."""

    paths: list[str] = field(default_factory=list)
    """Dataset directories written by `data_prep` (each with `metadata.json` and its shards)."""
    weights: list[float] | None = None
    """Blending weights, one per path; None weights every dataset equally."""
    tokenizer: str | None = None
    """Tokenizer directory or file; None uses the one saved with the first dataset."""
    seq_len: int = 128
    """Tokens per training sample T (samples hold T + 1 tokens for the shifted labels)."""
    seed: int = 1234
    """Seed of the deterministic sample shuffle."""
    eod_token_id: int | None = None
    """End-of-document token id; None takes it from the dataset metadata."""
    engram_sidecar: bool = False
    """Read precomputed Engram row ids from the data-prep sidecar instead of hashing on device."""


@dataclass
class OptimizerConfig:
    """Backbone optimizer and the row-sparse Adam of the Engram tables."""

    name: Literal["adamw", "muon"] = "adamw"
    """Backbone optimizer: `adamw`, or `muon` for 2-D hidden matrices (AdamW for the rest)."""
    lr: float = 1e-3
    """Base (peak) learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the backbone weight matrices (norms, biases, mHC b/alpha: none)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    engram_lr_multiplier: float = 5.0
    """Engram table learning rate = lr x this (paper: 5), with the same schedule."""
    engram_weight_decay: float = 0.0
    """Weight decay of the Engram tables (paper: 0)."""
    muon_momentum: float = 0.95
    """Muon momentum (Nesterov)."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations of Muon."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (applied to every group, the Engram tables included)."""

    kind: Literal["cosine", "wsd", "step", "constant"] = "cosine"
    """`cosine`: warmup then cosine to min_lr_ratio; `wsd`: warmup-stable-decay (linear decay over the
    last decay_fraction); `step`: the paper's step decay; `constant`: warmup then flat."""
    warmup_steps: int = 20
    """Linear warmup steps from 0."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine, wsd)."""
    decay_fraction: float = 0.2
    """WSD: fraction of the steps spent in the final decay."""
    step_milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])
    """Step decay: fractions of training at which the LR drops."""
    step_factors: list[float] = field(default_factory=lambda: [0.316, 0.1])
    """Step decay: LR multiplier of the base LR after each milestone."""


@dataclass
class DeepSpeedSettings:
    """DeepSpeed engine: a JSON from `ds_configs/` merged with the run settings."""

    config: str = "ds_configs/zero2.json"
    """Base DeepSpeed JSON (relative to the repository root or absolute)."""
    zero_stage: int | None = None
    """Override of `zero_optimization.stage` (0-3); None keeps the file's value."""
    bf16: bool = False
    """Train in bf16 (GPU); CPU runs stay fp32."""
    offload_optimizer: bool = False
    """Offload optimizer states to host memory (ZeRO >= 1)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed keys merged last (nested dict)."""


@dataclass
class TrainLoopConfig:
    """The training loop."""

    steps: int = 200
    """Optimizer steps of the run."""
    micro_batch_size: int = 4
    """Sequences per micro-batch per rank."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 42
    """Seed of parameter init and dropout-free randomness."""
    eval_interval: int = 50
    """Run validation every N steps (and at the end); 0 disables it."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    log_interval: int = 10
    """Log metrics every N steps."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    deterministic: bool = False
    """Use deterministic algorithms (exact resume tests)."""
    compile: bool = False
    """`torch.compile` each transformer block (inductor; the first steps compile: minutes on a CPU)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Activation recompute (gradients unchanged; MoE loads counted once): `full` frees a recomputed
    block's activations after the forward and recomputes the block in the backward; `selective` drops only
    the cheap, memory-heavy outputs (mHC coefficients and stream mixes, RMSNorms, SwiGLU activations, the
    Engram gate and short conv) and keeps matmul outputs, lookups and collectives (docs/training.md)."""
    activation_checkpointing_every: int = 1
    """With `full` or `selective`: recompute blocks 0, n, 2n, ... (1: every block)."""


@dataclass
class CheckpointConfig:
    """Checkpoint writing and resume."""

    dir: str | None = None
    """Checkpoint directory; None means `<output_dir>/checkpoints`."""
    interval: int = 100
    """Save every N steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest k complete checkpoints."""
    resume: str | None = "auto"
    """`auto` resumes from the latest complete checkpoint if one exists; a path resumes from it;
    None starts fresh."""
    init_from: str | None = None
    """Continued pretraining: a run that starts fresh (nothing to resume) takes its model weights, MoE router
    biases and Engram tables from this exported Hugging Face folder or training checkpoint (step_<N>/,
    checkpoint or run directory); optimizer state, step and data position start fresh. Any parallel layout
    (ZeRO stage, ep_size, table sharding) may differ from the source's."""


@dataclass
class LoggingConfig:
    """Metric sinks."""

    jsonl: bool = True
    """Write `metrics.jsonl` in the run directory."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb: bool = False
    """Log to Weights & Biases when the package is installed."""
    wandb_project: str = "engram-pretrain"
    """W&B project name."""


@dataclass
class ParallelConfig:
    """Distributed layout: world = data parallel x expert parallel."""

    ep_size: int = 1
    """Expert-parallel group size; must divide the world size and be at most the routed expert count (it
    need not divide it: the first E mod ep ranks of a group hold one expert more)."""
    table_sharding: Literal["replicated", "sharded"] = "replicated"
    """Engram tables replicated on every rank, or row-sharded over the world."""
    host_tables: bool = False
    """Keep Engram table rows and their Adam state in host memory, with prefetch."""
    kernel_backend: Literal["auto", "cuda", "cpp", "torch"] = "auto"
    """Implementation of the Engram gather/update ops."""


@dataclass
class LauncherConfig:
    """Process launch, locally or under SLURM."""

    nodes: int = 1
    """Number of nodes."""
    procs_per_node: int = 1
    """Processes (GPUs) per node."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto is nccl with CUDA, gloo otherwise."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    time: str | None = None
    """SLURM time limit (e.g. 04:00:00)."""
    qos: str | None = None
    """SLURM QOS."""
    constraint: str | None = None
    """SLURM node constraint."""
    signal_seconds: int = 120
    """Send SIGUSR1 this many seconds before the time limit (checkpoint and requeue)."""
    master_port: int = 29500
    """Rendezvous port."""


SLURM_OPTIONS = ("partition", "account", "time", "qos", "constraint")
"""The `LauncherConfig` fields that are sbatch options of the same name (`--partition=...`)."""


@dataclass
class RunConfig:
    """Everything one run needs."""

    name: str = "run"
    """Run name (used for the run directory)."""
    output_dir: str = "runs/run"
    """Run directory: checkpoints, logs, metrics, plots."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizers."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    """DeepSpeed engine."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Launching."""

    def validate(self) -> None:
        """Cross-field checks; raise ConfigError naming the key."""
        try:
            self.model.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        d, o, s, t, p = self.data, self.optimizer, self.schedule, self.train, self.parallel
        _need(d.seq_len > 0, "data.seq_len", "must be positive")
        _need(d.seq_len <= self.model.max_seq_len, "data.seq_len",
              f"{d.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if d.weights is not None:
            _need(len(d.weights) == len(d.paths), "data.weights",
                  f"has {len(d.weights)} entries for {len(d.paths)} data.paths")
            _need(all(w >= 0 for w in d.weights) and sum(d.weights) > 0, "data.weights",
                  "must be non-negative with a positive sum")
        _need(o.lr > 0, "optimizer.lr", "must be positive")
        _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas",
              "needs two values in [0, 1)")
        _need(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")
        _need(o.engram_lr_multiplier > 0, "optimizer.engram_lr_multiplier", "must be positive")
        _need(0 <= s.warmup_steps <= t.steps, "schedule.warmup_steps",
              f"{s.warmup_steps} must be in [0, train.steps={t.steps}]")
        _need(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        _need(0 < s.decay_fraction <= 1, "schedule.decay_fraction", "must be in (0, 1]")
        _need(len(s.step_milestones) == len(s.step_factors), "schedule.step_factors",
              "needs one factor per step_milestones entry")
        _need(list(s.step_milestones) == sorted(s.step_milestones)
              and all(0 < m < 1 for m in s.step_milestones), "schedule.step_milestones",
              "must be increasing fractions in (0, 1)")
        _need(t.steps > 0, "train.steps", "must be positive")
        _need(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _need(t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
        _need(t.activation_checkpointing_every >= 1, "train.activation_checkpointing_every", "must be >= 1")
        _need(not (t.compile and t.activation_checkpointing == "selective"), "train.activation_checkpointing",
              "selective recompute runs eager (saved-tensor hooks); use full with train.compile")
        _need(self.deepspeed.zero_stage in (None, 0, 1, 2, 3), "deepspeed.zero_stage", "must be 0-3")
        _need(p.ep_size >= 1, "parallel.ep_size", "must be >= 1")
        _need(p.ep_size <= self.model.moe.num_routed_experts, "parallel.ep_size",
              f"{p.ep_size} exceeds model.moe.num_routed_experts={self.model.moe.num_routed_experts} "
              "(every expert-parallel rank needs at least one routed expert)")
        _need(not (p.host_tables and p.kernel_backend == "cuda"), "parallel.kernel_backend",
              "cuda: the CUDA ops take device tensors, host tables are gathered and stepped on the host "
              "(use cpp or auto with parallel.host_tables)")
        _need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _need(self.checkpoint.init_from is None or bool(str(self.checkpoint.init_from).strip()),
              "checkpoint.init_from", "must be a path (an exported folder or a checkpoint) or null")
        _need(self.launcher.nodes >= 1, "launcher.nodes", "must be >= 1")
        _need(self.launcher.procs_per_node >= 1, "launcher.procs_per_node", "must be >= 1")


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ---------------------------------------------------------------- dict <-> dataclass

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- YAML + overrides

def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dataclasses: key -> (a's, b's)."""
    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, dictionaries recursively (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_tree(path: str | Path) -> dict[str, Any]:
    """Read a YAML config, resolving its `base:` chain (paths relative to the including file)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(read_yaml_tree(path.parent / base), data)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a validated RunConfig from YAML (or defaults) plus dotted overrides."""
    tree = read_yaml_tree(path) if path is not None else {}
    for override in overrides or []:
        apply_override(tree, override)
    cfg = from_dict(RunConfig, tree)
    cfg.validate()
    return cfg


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or a preset name from `configs/` (e.g. `engram-27b`)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = PRESET_DIR / f"{name}.yaml"
    if not preset.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(names)}")
    return preset


def load_preset(name: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """`load_config` of a preset name or YAML path (`resolve_config_path`) with dotted overrides."""
    return load_config(resolve_config_path(name), overrides)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
