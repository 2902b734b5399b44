"""Run sets: the model families, one planned run, and the settings every run of an experiment shares.

A *family* is a pair (MoE baseline, iso-parameter MoE+Engram reference):

| family | baseline | reference |
|---|---|---|
| `proxy` | `proxy-moe` | `proxy-engram` |
| `3b` | `moe-3b` | `moe-3b-engram-1.6b` |
| `tiny` | derived: `tiny` without Engram, its parameters as routed experts | `tiny` |

Experiments (`ablation`, `allocation`) derive their variants from these two configs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import RunConfig, apply_override, from_dict, to_dict

if TYPE_CHECKING:
    from .budget import Accounting

FAMILIES: dict[str, tuple[str | None, str]] = {
    "proxy": ("proxy-moe", "proxy-engram"),
    "3b": ("moe-3b", "moe-3b-engram-1.6b"),
    "tiny": (None, "tiny"),
}
"""family -> (baseline preset or None for the derived iso-parameter MoE, reference preset)."""


@dataclass
class PlannedRun:
    """One run of an experiment: its resolved config and what it is."""

    name: str
    """Directory-safe name (`baseline`, `layer_3`, `wo_gating`, `plus_4gram`, `alloc_20`, ...)."""
    label: str
    """Display label (`w/o gating`, `+4-gram`, `layer 4`, ...)."""
    kind: str
    """baseline | reference | sweep | ablation | seed | allocation."""
    cfg: RunConfig
    changes: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys (vs. the reference, or the baseline for allocation runs) and their new values."""
    layer: int | None = None
    """Layer sweep: the 0-based block index of the single Engram layer."""
    info: dict[str, Any] = field(default_factory=dict)
    """Experiment-specific columns (allocation: target share, removed experts)."""
    acc: Accounting | None = None

    def accounting(self) -> Accounting:
        from .budget import accounting

        if self.acc is None:
            self.acc = accounting(self.cfg.model)
        return self.acc


def normalize_name(name: str) -> str:
    """`w/o gating`, `w/o_gating`, `wo-gating` -> `wo_gating`; `+4-gram` -> `plus_4gram`."""
    s = name.strip().lower().replace("w/o", "wo").replace("+", "plus_")
    s = s.replace("4-gram", "4gram")
    s = re.sub(r"[\s/\-]+", "_", s)
    return re.sub(r"_+", "_", s).strip("_")


def select(runs: list[PlannedRun], only: list[str] | None) -> list[PlannedRun]:
    """The runs named in `only` (any spelling `normalize_name` accepts), in plan order; None keeps all."""
    if not only:
        return runs
    wanted = [normalize_name(n) for n in only]
    names = [r.name for r in runs]
    unknown = [o for o, w in zip(only, wanted, strict=True) if w not in names]
    if unknown:
        raise ValueError(f"--only: unknown run(s) {', '.join(unknown)}; the plan has: {', '.join(names)}")
    return [r for r in runs if r.name in wanted]


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A validated copy of `cfg` with dotted overrides applied."""
    tree = to_dict(cfg)
    for override in overrides:
        apply_override(tree, override)
    out = from_dict(RunConfig, tree)
    out.validate()
    return out


def load_family(family: str, overrides: list[str] | None = None, baseline: str | None = None,
                reference: str | None = None) -> tuple[RunConfig, RunConfig, str]:
    """(baseline, reference, how the baseline was obtained) of a family; `baseline`/`reference` replace the
    family's presets (preset names or YAML paths). `overrides` apply to both before anything is derived."""
    from ..config import load_preset
    from .budget import iso_moe_baseline

    if family not in FAMILIES and (baseline is None or reference is None):
        raise ValueError(f"unknown family '{family}' (known: {', '.join(FAMILIES)}); or give both "
                         "--baseline and --reference")
    base_name, ref_name = FAMILIES.get(family, (None, ""))
    base_name, ref_name = baseline or base_name, reference or ref_name
    ref = load_preset(ref_name, list(overrides or []))
    if not ref.model.engram.layers:
        raise ValueError(f"reference {ref_name} has no Engram layers")
    if base_name is not None:
        base = load_preset(base_name, list(overrides or []))
        if base.model.engram.layers:
            raise ValueError(f"baseline {base_name} has Engram layers {base.model.engram.layers}")
        return base, ref, f"preset {base_name}"
    base = copy.deepcopy(ref)
    base.model = iso_moe_baseline(ref.model)
    base.name = f"{ref.name}-moe"
    added = base.model.moe.num_routed_experts - ref.model.moe.num_routed_experts
    return base, ref, (f"derived from {ref_name}: Engram removed, {added} routed experts added "
                       f"({base.model.moe.num_routed_experts} in all)")


@dataclass
class RunSettings:
    """What every run of an experiment shares, applied after the variants are derived."""

    out_dir: Path
    family: str
    steps: int | None = None
    data: list[str] | None = None
    nproc: int = 1
    keep_last: int = 1
    """Checkpoints kept per run (the final one is what marks a run finished)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to every run last (no model keys: they would break the budget)."""


def finalize(run: PlannedRun, s: RunSettings) -> list[str]:
    """Apply the shared settings to `run.cfg` in place (name, output_dir, steps, data, ranks);
    returns notes about adjustments."""
    notes = []
    cfg = run.cfg
    over = [f"name={s.family}-{run.name}", f"output_dir={(s.out_dir / run.name).absolute()}",
            f"checkpoint.keep_last={s.keep_last}", f"launcher.procs_per_node={s.nproc}", "launcher.nodes=1"]
    if s.steps is not None:
        over.append(f"train.steps={s.steps}")
        if cfg.schedule.warmup_steps > s.steps:
            warm = max(1, s.steps // 10)
            over.append(f"schedule.warmup_steps={warm}")
            notes.append(f"schedule.warmup_steps {cfg.schedule.warmup_steps} > {s.steps} steps: "
                         f"set to {warm}")
    if s.data is not None:
        over.append(f"data.paths=[{', '.join(s.data)}]")
    model_keys = [o for o in s.overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if model_keys:
        raise ValueError(f"run overrides may not change the model (the budget is fixed): {model_keys}")
    run.cfg = with_overrides(cfg, [*over, *s.overrides])
    return notes


