"""Iso-parameter accounting (Engram paper §3.1; docs/model.md rules X1-X2): counts, table rows,
table-size calibration, MoE baselines.

    acc = accounting(cfg.model)                       # total / activated / tables / rows / share
    model = calibrate_tables(model, target_total)     # base_table_size so that total == target (to a row)
    moe = iso_moe_baseline(engram_model)              # no Engram, routed experts added to the same total

Every count comes from `analysis.params.count_parameters` (the model built on the meta device); table rows
come from the same prime search the model uses (`memory.reference_hash.table_primes`). Building a model on the
meta device takes seconds, so `counts` builds each *shape* once: a config with its Engram layer indices and
table sizes left out (neither changes any other parameter); the table parameters are then rows x d_head.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import asdict, dataclass

from ..analysis.params import ParamCounts, count_parameters
from ..memory.reference_hash import table_primes
from ..model.config import ModelConfig


@dataclass
class Accounting:
    """Parameter accounting of one model config (activated/sparse without embedding and LM head)."""

    total: int
    activated: int
    sparse: int
    engram_tables: int
    engram_dense: int
    table_rows: int
    routed_experts: int
    """Routed-expert parameters of all MoE layers."""

    @property
    def engram_share(self) -> float:
        """Share of the sparse parameters held by Engram tables (Figure 3's x-axis)."""
        return self.engram_tables / self.sparse if self.sparse else 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {**asdict(self), "engram_share": self.engram_share}


def table_rows(model: ModelConfig) -> int:
    """Rows of all Engram tables of `model` (sum of the prime head sizes over layers, orders, heads)."""
    e = model.engram
    if not e.layers:
        return 0
    return _rows(len(e.layers), e.max_ngram, e.num_heads, tuple(model.engram_base_sizes()))


@functools.lru_cache(maxsize=4096)
def _rows(num_layers: int, max_ngram: int, heads: int, bases: tuple[int, ...]) -> int:
    # the prime search depends on the number of layers, not on their indices
    primes = table_primes(list(range(num_layers)), max_ngram, heads, list(bases))
    return sum(p for per_order in primes.values() for heads_p in per_order for p in heads_p)


_SHAPES: dict[str, tuple[ParamCounts, int]] = {}


def _shape_key(model: ModelConfig) -> str:
    tree = asdict(model)
    tree["engram"]["layers"] = len(model.engram.layers)
    tree["engram"]["base_table_size"] = None
    return json.dumps(tree, sort_keys=True)


def counts(model: ModelConfig) -> ParamCounts:
    """`count_parameters(model)`, with one model instantiation per shape (see the module docstring)."""
    key = _shape_key(model)
    if key not in _SHAPES:
        _SHAPES[key] = (count_parameters(model), table_rows(model))
    c, rows = _SHAPES[key]
    extra = d_head(model) * (table_rows(model) - rows) if model.engram.layers else 0
    return dataclasses.replace(c, total=c.total + extra, engram_tables=c.engram_tables + extra)


def d_head(model: ModelConfig) -> int:
    """Width of one table row: d_mem / ((max_ngram - 1) * num_heads)."""
    e = model.engram
    return e.d_mem // ((e.max_ngram - 1) * e.num_heads)


def accounting(model: ModelConfig, precomputed: ParamCounts | None = None) -> Accounting:
    """Counts of `model` (pass `precomputed` when already counted)."""
    c = counts(model) if precomputed is None else precomputed
    return Accounting(total=c.total, activated=c.activated, sparse=c.sparse, engram_tables=c.engram_tables,
                      engram_dense=c.engram_dense, table_rows=table_rows(model),
                      routed_experts=c.routed_experts)


def with_engram(model: ModelConfig, **changes: object) -> ModelConfig:
    """A deep copy of `model` with `model.engram.<key>` set for each keyword."""
    out = copy.deepcopy(model)
    for key, value in changes.items():
        if not hasattr(out.engram, key):
            raise ValueError(f"model.engram.{key}: unknown key")
        setattr(out.engram, key, copy.deepcopy(value))
    out.validate()
    return out


def calibrate_tables(model: ModelConfig, target_total: int, max_iter: int = 12) -> ModelConfig:
    """Shift every entry of `engram.base_table_size` by one common offset so that the total parameter count
    is as close to `target_total` as the prime table sizes allow (within about one prime gap per head).

    Raises ValueError when the target needs tables smaller than 2 rows per head."""
    e = model.engram
    if not e.layers:
        raise ValueError("calibrate_tables needs a model with Engram layers")
    bases = model.engram_base_sizes()
    width = d_head(model)
    heads = len(e.layers) * (e.max_ngram - 1) * e.num_heads
    fixed = counts(model).total - width * table_rows(model)  # everything but the table rows

    def shifted(delta: int) -> ModelConfig:
        return with_engram(model, base_table_size=[b + delta for b in bases])

    def total(delta: int) -> int:
        return fixed + width * table_rows(shifted(delta))

    delta, seen = 0, {}
    for _ in range(max_iter):
        seen[delta] = total(delta)
        step = round((target_total - seen[delta]) / (width * heads))
        if step == 0 or delta + step in seen:
            break
        delta += step
        if min(bases) + delta < 2:
            raise ValueError(f"a total of {target_total:,} parameters leaves no room for Engram tables "
                             f"(base_table_size would drop below 2)")
    best = min(seen, key=lambda d: (abs(seen[d] - target_total), abs(d)))
    return shifted(best)


def routed_expert_cost(model: ModelConfig) -> tuple[int, int]:
    """(total, routed-expert) parameters of one routed expert across all MoE layers (router row included
    in the total)."""
    more = copy.deepcopy(model)
    more.moe.num_routed_experts += 1
    a, b = counts(model), counts(more)
    return b.total - a.total, b.routed_experts - a.routed_experts


def iso_moe_baseline(model: ModelConfig) -> ModelConfig:
    """The MoE baseline of an Engram model: Engram removed, its parameters given back as routed experts
    (rounded to the nearest whole expert), top_k unchanged."""
    if not model.engram.layers:
        raise ValueError("iso_moe_baseline needs a model with Engram layers")
    target = counts(model).total
    out = with_engram(model, layers=[])
    per_expert, _ = routed_expert_cost(out)
    out.moe.num_routed_experts += round((target - counts(out).total) / per_expert)
    out.validate()
    return out


def relative_delta(value: int, reference: int) -> float:
    """(value - reference) / reference."""
    return (value - reference) / reference if reference else 0.0
