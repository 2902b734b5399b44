"""Whole-model state dicts: of a checkpoint on disk (`checkpoint_state_dict`: export, init_from, analysis)
and of a live run (`consolidated_state_dict`), both under the names of a model with local Engram tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...model.transformer import ROUTER_BIAS_SUFFIX, table_weight_name
from .experts import read_expert_weights
from .layout import BUFFERS, DS_TAG, read_trainer_state
from .tables import TABLES_DIR, read_full_tables

if TYPE_CHECKING:
    from ..components import TrainComponents


def checkpoint_state_dict(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a training checkpoint: the names of a model with local Engram tables
    (`blocks.<L>.engram.table.weight`), MoE router biases included.

    Backbone: with ZeRO stages 1-3, the fp32 master weights reconstructed by DeepSpeed's `zero_to_fp32` from
    the optimizer partitions; with stage 0 or expert parallelism, the engine's module file (its compute
    dtype), the routed experts then replaced by the fp32 shards of `experts/ep_rank_<r>.pt` concatenated in
    expert order. Engram tables: the `tables/` row-range files (format 2) or `tables.pt` (format 1). Router
    biases: `buffers.pt`, the copy the trainer restores from.
    """
    step_dir = Path(step_dir)
    trainer = read_trainer_state(step_dir)
    experts = read_expert_weights(step_dir)
    if int(trainer.get("zero_stage", 0)) > 0 and experts is None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG))
    else:
        files = sorted((step_dir / DS_TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"{step_dir}/{DS_TAG}: no mp_rank_*_model_states.pt "
                             "(not a DeepSpeed checkpoint)")
        state = dict(torch.load(files[0], map_location="cpu", weights_only=False)["module"])
    if experts is not None:
        state.update(experts)
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}
    if (step_dir / TABLES_DIR).is_dir():  # row-range files of replicated or sharded tables, assembled whole
        tables = read_full_tables(step_dir / TABLES_DIR)
    elif (step_dir / "tables.pt").is_file():
        tables = torch.load(step_dir / "tables.pt", map_location="cpu", weights_only=True)
    else:
        tables = {}
    for layer, weight in tables.items():
        state[table_weight_name(layer)] = weight.float()
    if (step_dir / BUFFERS).is_file():
        biases = torch.load(step_dir / BUFFERS, map_location="cpu", weights_only=True)["moe_expert_bias"]
        names = sorted((k for k in state if k.endswith(ROUTER_BIAS_SUFFIX)),
                       key=lambda k: int(k.split(".")[1]))
        if len(names) != len(biases):
            raise ValueError(f"{step_dir}/{BUFFERS}: {len(biases)} router biases for {len(names)} MoE layers")
        state.update({name: bias.float() for name, bias in zip(names, biases, strict=True)})
    return state


def consolidated_state_dict(c: TrainComponents) -> dict[str, torch.Tensor]:
    """Full CPU state dict of the model *with* its tables under `blocks.<L>.engram.table.weight` (the names of
    a model built with `LocalEngramTable`s). Collective under ZeRO-3 (parameters are gathered), with
    expert parallelism (all routed experts gathered over the EP group) and with sharded tables (every rank
    gets the whole tables)."""
    import deepspeed

    params = list(c.model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=c.zero_stage == 3):
        state = {k: v.detach().cpu().clone() for k, v in c.model.state_dict().items()}
    if c.expert_parallel is not None:
        state.update(c.expert_parallel.full_expert_state(c.model))
    for layer in c.tables.layers():
        state[table_weight_name(layer)] = c.tables.full_weight(layer)
    return state
