"""The ablation run set of the Engram paper's §6.2 / Figure 5 (docs/model.md rule X3) for one family.

| run | what |
|---|---|
| `baseline` | the MoE baseline |
| `reference` | the iso-parameter MoE+Engram reference (two Engram layers: the paper's layers 2 and 6) |
| `layer_<i>` | the layer sweep: ONE Engram layer at block index i (0-based) holding the full table budget |
| `wo_multi_branch`, `wo_token_compress`, `wo_gating`, `wo_short_conv` | one component switched off |
| `plus_4gram` | max_ngram 4 (2-, 3- and 4-grams) at the same budget: d_head shrinks |
| `reference_seed<k>` | `--repeat-seeds K`: the reference with train.seed + k (seed-to-seed noise) |

Every Engram variant is iso-parameter with the reference: its `engram.base_table_size` (one common offset
on every order's prime-search start) is calibrated so that the total parameter count matches the
reference's to within a prime gap per head (`budget.calibrate_tables`). The layer sweep starts from the
reference's base sizes times its number of Engram layers (equal table rows), the ablations from the
reference's; calibration then gives back the projections a variant lacks (one Engram layer instead of two,
no key projections without gating, ...) or takes those it adds as table rows. `+4-gram` keeps d_mem when
(N-1) * heads divides it, else the largest multiple of (N-1) * heads below it.
"""

from __future__ import annotations

import copy
from typing import Any

from ..config import RunConfig, config_diff
from ..model.config import ModelConfig
from .budget import calibrate_tables, counts, with_engram
from .plan import PlannedRun

ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "wo_multi_branch": ("w/o multi branch", {"multi_branch": False}),
    "wo_token_compress": ("w/o token compress", {"token_compression": False}),
    "wo_gating": ("w/o gating", {"gating": False}),
    "wo_short_conv": ("w/o short conv", {"short_conv": False}),
    "plus_4gram": ("+4-gram", {"max_ngram": 4}),
}
"""name -> (label, engram keys changed before the budget calibration)."""


def more_orders(model: ModelConfig, max_ngram: int) -> ModelConfig:
    """`model` with n-grams up to `max_ngram`: the new orders start their prime search where the highest
    existing order does; d_mem drops to the largest multiple of (max_ngram - 1) * heads not above it."""
    e = model.engram
    groups = (max_ngram - 1) * e.num_heads
    d_mem = e.d_mem - e.d_mem % groups
    if d_mem == 0:
        raise ValueError(f"d_mem={e.d_mem} is smaller than (max_ngram - 1) * num_heads = {groups}")
    bases = model.engram_base_sizes()
    bases = (bases + [bases[-1]] * max_ngram)[:max_ngram - 1]
    return with_engram(model, max_ngram=max_ngram, d_mem=d_mem, base_table_size=bases)


def single_layer(model: ModelConfig, layer: int) -> ModelConfig:
    """One Engram layer at `layer` with the tables of all of `model`'s Engram layers (base sizes x layers)."""
    n = len(model.engram.layers)
    return with_engram(model, layers=[layer], base_table_size=[b * n for b in model.engram_base_sizes()])


def _variant(reference: RunConfig, model: ModelConfig) -> RunConfig:
    cfg = copy.deepcopy(reference)
    cfg.model = model
    cfg.validate()
    return cfg


def _changes(reference: RunConfig, cfg: RunConfig) -> dict[str, Any]:
    """Dotted keys of `cfg` that differ from `reference` (run name and directory aside)."""
    return {k: b for k, (_, b) in config_diff(reference, cfg).items() if k not in ("name", "output_dir")}


def layer_label(layers: list[int]) -> str:
    """`[1, 5]` -> `layers 2 & 6` (the paper's 1-based numbering)."""
    names = [str(x + 1) for x in layers]
    return ("layer " if len(names) == 1 else "layers ") + " & ".join(names)


def ablation_plan(baseline: RunConfig, reference: RunConfig, layers: list[int] | None = None,
                  ablations: list[str] | None = None, repeat_seeds: int = 0) -> list[PlannedRun]:
    """The run set: baseline, reference, the layer sweep over `layers` (default: every block), the component
    `ablations` (default: all of ABLATIONS), and `repeat_seeds` extra seeds of the reference."""
    ref_model = reference.model
    if not ref_model.engram.layers:
        raise ValueError("the reference needs Engram layers")
    target = counts(ref_model).total
    layers = list(range(ref_model.num_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < ref_model.num_layers:
            raise ValueError(f"sweep layer {layer} out of range [0, {ref_model.num_layers})")
    names = list(ABLATIONS) if ablations is None else list(ablations)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
    runs = [
        PlannedRun("baseline", "MoE baseline", "baseline", copy.deepcopy(baseline),
                   {k: v for k, v in _changes(reference, baseline).items()
                    if not k.startswith("model.engram.") or k == "model.engram.layers"}),
        PlannedRun("reference", f"Engram reference ({layer_label(ref_model.engram.layers)})", "reference",
                   copy.deepcopy(reference)),
    ]
    for layer in layers:
        cfg = _variant(reference, calibrate_tables(single_layer(ref_model, layer), target))
        runs.append(PlannedRun(f"layer_{layer}", layer_label([layer]), "sweep", cfg, _changes(reference, cfg),
                               layer=layer))
    for name in names:
        label, keys = ABLATIONS[name]
        if "max_ngram" in keys:
            if keys["max_ngram"] == ref_model.engram.max_ngram:
                raise ValueError(f"{name}: the reference already uses max_ngram {keys['max_ngram']}")
            model = more_orders(ref_model, keys["max_ngram"])
        else:
            model = with_engram(ref_model, **keys)
        cfg = _variant(reference, calibrate_tables(model, target))
        runs.append(PlannedRun(name, label, "ablation", cfg, _changes(reference, cfg)))
    for k in range(1, repeat_seeds + 1):
        cfg = copy.deepcopy(reference)
        cfg.train.seed = reference.train.seed + k
        runs.append(PlannedRun(f"reference_seed{k}", f"reference, seed {cfg.train.seed}", "seed", cfg,
                               _changes(reference, cfg)))
    return runs
