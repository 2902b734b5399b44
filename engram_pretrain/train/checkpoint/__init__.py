"""Training checkpoints, the one owner of their format: DeepSpeed engine state plus everything DeepSpeed does
not know about. Modules: `layout` (names, discovery, trainer.json), `checkpointer` (atomic save/load),
`tables` (Engram row-range files), `experts` (expert-parallel shards), `consolidate` (whole-model state
dicts).

Layout of one checkpoint (`<ckpt_dir>/step_<N>/`):

    ds/                      DeepSpeed `engine.save_checkpoint(tag="ds")`: module weights and buffers (MoE
                             router biases included), ZeRO optimizer partitions (one file per rank)
    tables/                  Engram tables with their RowSparseAdam state, one file per row range:
                             table_<layer>_rows_<start>_<end>.pt (replicated: rank 0 writes [0, rows);
                             sharded: every rank its shard); reloads under any world size and layout
                             (`tables`)
    buffers.pt               MoE router biases [E] per MoE layer (also inside ds/; restored from here too)
    experts/                 (parallel.ep_size > 1) routed expert weights, ep_rank_<r>.pt per EP rank with its
                             global expert range, and meta.json (docs/expert_parallel.md)
    rng/rank_<r>.pt          python / numpy / torch (/ CUDA) RNG states of every rank
    trainer.json             step, data-loader position, counters, world size, ZeRO stage
    config.yaml              the resolved run config
    complete                 marker, written last inside the directory

Protocol: every rank writes into `step_<N>.tmp/`; after a barrier rank 0 writes `complete`, renames the
directory to `step_<N>/`, then replaces the `latest` pointer file (temp file + `os.replace`), then prunes
old checkpoints beyond `keep_last`. A save killed at any point leaves at most a `*.tmp` directory, which
resume ignores (and the next save removes); the previous checkpoints are untouched until the new one is
complete. The checkpoint directory must be shared by all ranks (one filesystem).
"""

from .checkpointer import Checkpointer, SaveReport, rng_state, set_rng_state
from .consolidate import checkpoint_state_dict, consolidated_state_dict
from .experts import EXPERTS_DIR, check_expert_checkpoint, checkpoint_ep_size
from .layout import (
    COMPLETE,
    FORMAT,
    LATEST,
    checkpoint_dir,
    complete_checkpoints,
    find_latest,
    is_complete,
    read_trainer_state,
    resolve_checkpoint,
    resolve_resume,
    step_dir_name,
)
from .tables import TABLES_DIR, load_table_shards, read_full_tables, save_table_shards

__all__ = [
    "COMPLETE", "EXPERTS_DIR", "FORMAT", "LATEST", "TABLES_DIR", "Checkpointer", "SaveReport",
    "check_expert_checkpoint", "checkpoint_dir", "checkpoint_ep_size", "checkpoint_state_dict",
    "complete_checkpoints", "consolidated_state_dict", "find_latest", "is_complete", "load_table_shards",
    "read_full_tables", "read_trainer_state", "resolve_checkpoint", "resolve_resume", "rng_state",
    "save_table_shards", "set_rng_state", "step_dir_name",
]
