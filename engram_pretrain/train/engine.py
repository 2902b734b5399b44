"""Assemble a training run: the model with its Engram tables outside DeepSpeed (`memory.table_store`),
the DeepSpeed engine over the backbone (`train.ds_config`, `train.optimizers`), the table optimizer, and
the optional starting weights (`checkpoint.init_from`). The pieces: `train.distributed` (process group),
`train.ds_config`, `memory.table_store`, `train.optimizers`, `train.components` (the assembled types).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig
from ..memory.table_store import TableStore
from ..model.transformer import EngramMoEModel
from ..parallel.expert_parallel import ExpertParallel, setup_expert_parallel
from .components import TrainComponents
from .distributed import DistInfo, enable_deterministic, quiet_deepspeed, seed_everything
from .ds_config import build_ds_config
from .optimizers import build_backbone_optimizer, build_table_optimizer

if TYPE_CHECKING:
    from ..data.dataset_dir import DatasetDir
    from ..memory.compression import CompressionMap

logger = logging.getLogger(__name__)


def compression_map_for(cfg: RunConfig, dataset: DatasetDir | None) -> CompressionMap | None:
    """The dataset's tokenizer compression map when the model hashes compressed ids, else None."""
    e = cfg.model.engram
    if not e.layers or not e.token_compression:
        return None
    if dataset is None:
        raise ValueError("model.engram.token_compression needs a dataset directory with compression_map.npz")
    return dataset.compression_map()


def build_model(cfg: RunConfig, compression: CompressionMap | None,
                expert_parallel: ExpertParallel | None = None, device: torch.device | str = "cpu",
                table_group: Any | None = None) -> tuple[EngramMoEModel, TableStore]:
    """The model with its tables in a separate `TableStore` (seeded: identical on every rank; with expert
    parallelism each rank holds its slice of the same routed experts)."""
    from ..memory.addressing_builder import build_addressing

    seed_everything(cfg.train.seed)
    store = table_store_for(cfg, device, table_group)
    addressing = build_addressing(cfg.model, compression) if cfg.model.engram.layers else None
    model = EngramMoEModel(cfg.model, addressing,
                           dispatcher=expert_parallel.dispatcher if expert_parallel is not None else None,
                           table_factory=store.factory(cfg.model.engram.table_init_std, sparse=True))
    if expert_parallel is not None:
        expert_parallel.prepare_model(model)
    if cfg.train.activation_checkpointing != "none":
        model.recompute_every = cfg.train.activation_checkpointing_every
        model.selective_recompute = cfg.train.activation_checkpointing == "selective"
    if cfg.train.compile:
        for block in model.blocks:  # block by block: the embedding, hashing and head stay eager
            block.compile()
    return model, store


def table_store_for(cfg: RunConfig, device: torch.device | str = "cpu",
                    table_group: Any | None = None) -> TableStore:
    """The `TableStore` of `cfg.parallel` (table_sharding, host_tables; kernel_backend for the host tier and
    for device tables where it resolves to compiled ops: `kernels.device_table_ops`)."""
    p = cfg.parallel
    if p.table_sharding == "sharded" and cfg.model.engram.layers and not dist.is_initialized():
        raise ConfigError("parallel.table_sharding=sharded needs torch.distributed (launch through the "
                          "trainer, torchrun or srun)")
    from ..kernels import get_ops

    ops = get_ops(p.kernel_backend) if cfg.model.engram.layers else None
    return TableStore(sharding=p.table_sharding, host=p.host_tables, device=device, group=table_group,
                      ops=ops, seed=cfg.train.seed)


def table_process_group(cfg: RunConfig) -> Any | None:
    """Collective on every rank: the shard group of sharded tables, a group of its own over the whole world
    so the tables' all-to-alls never interleave with DeepSpeed's reductions on one communicator (None when
    the tables are replicated)."""
    if cfg.parallel.table_sharding != "sharded" or not cfg.model.engram.layers:
        return None
    return dist.new_group(ranks=list(range(dist.get_world_size())))


def build_components(cfg: RunConfig, info: DistInfo, dataset: DatasetDir | None,
                     init_from: str | None = None) -> TrainComponents:
    """Model + tables + DeepSpeed engine + table optimizer for this rank; with `init_from` (a Hugging Face
    export or training checkpoint) the model and tables start from its weights (`checkpoint.init_from`)."""
    import deepspeed

    quiet_deepspeed()
    if cfg.train.deterministic:
        enable_deterministic()
    if cfg.data.engram_sidecar and info.rank == 0:
        logger.warning("data.engram_sidecar: the trainer hashes row ids on device (bit-identical to the "
                       "sidecar); precomputed rows are not read yet")
    ds_config = build_ds_config(cfg, info.world_size, use_cuda=info.device.type == "cuda")
    zero_stage = int(ds_config["zero_optimization"]["stage"])
    if zero_stage == 3 and cfg.train.activation_checkpointing == "selective":
        # ZeRO-3 releases a module's parameters after its forward; a selective region's backward recompute
        # runs the module again and differentiates after that release (docs/training.md)
        raise ConfigError("train.activation_checkpointing: selective is not supported with ZeRO stage 3 "
                          "yet; use full (or ZeRO 0-2)")
    expert_parallel = setup_expert_parallel(cfg, info.world_size, zero_stage)  # None when ep_size == 1
    model, store = build_model(cfg, compression_map_for(cfg, dataset), expert_parallel, device=info.device,
                               table_group=table_process_group(cfg))
    if init_from is not None:
        from .init_from import load_initial_weights

        load_initial_weights(cfg, model, store, expert_parallel, init_from)
    optimizer = build_backbone_optimizer(model, cfg, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    if ds_config["bf16"]["enabled"]:
        for table in store.views.values():
            table.compute_dtype = torch.bfloat16
    if info.world_size > 1 and not store.sharded and not store.host:
        for p in store.parameters():  # replicas start identical (the init is seeded; this guards drift)
            dist.broadcast(p.data, src=0)
    eod = cfg.data.eod_token_id
    if eod is None and dataset is not None:
        eod = dataset.eod_token_id
    return TrainComponents(cfg=cfg, dist=info, engine=engine, model=engine.module, tables=store,
                           table_optimizer=build_table_optimizer(store, cfg), ds_config=ds_config,
                           eod_token_id=eod, expert_parallel=expert_parallel)
