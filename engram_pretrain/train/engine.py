"""Assemble a training run: process group, model, Engram tables outside DeepSpeed, the DeepSpeed engine.

The Engram tables are deliberately *not* parameters of the module DeepSpeed wraps. DeepSpeed's ZeRO
stages register gradient hooks on, flatten, partition and reduce every parameter of the module it is
given; a row-sparse table must not go through any of that. So the tables live in a separate
`TableStore` module, and the model receives `StoreTable` views of them through its table factory.
`StoreTable` is a plain object (not an `nn.Module`), so `EngramModule` keeps it as an attribute and the
table never appears in `model.parameters()`. Table gradients are sparse (`F.embedding(sparse=True)`)
and are applied by `RowSparseAdam`, which exchanges the touched rows across the data-parallel ranks so
every replica applies the same update. `parallel.table_sharding: sharded` gives each rank a contiguous row
range instead (`parallel.table_shard.ShardedTable`: lookups and row gradients travel by all-to-all, each
rank steps its own rows) and `parallel.host_tables: true` keeps the rows and their Adam state in host
memory with prefetch (`memory.tables`); see docs/parallelism.md.

The backbone optimizer is a client `torch.optim.AdamW` over `param_groups_for(model, cfg.optimizer)`
handed to `deepspeed.initialize` (no DeepSpeed scheduler: the trainer sets every group's LR each step).
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import REPO_ROOT, ConfigError, RunConfig
from ..model.engram_hash import segment_ids_from_eod
from ..model.transformer import EngramMoEModel
from ..parallel.expert_parallel import ExpertParallel, setup_expert_parallel, split_expert_param_groups

if TYPE_CHECKING:
    from ..data.dataset_dir import DatasetDir
    from ..memory.compression import CompressionMap

logger = logging.getLogger(__name__)

AUTO = "auto"
"""Placeholder in `ds_configs/*.json` for a value the run settings fill in."""


# ---------------------------------------------------------------------------- process group

@dataclass
class DistInfo:
    """Where this process sits in the world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise torch.distributed from the launcher's environment (torchrun, deepspeed, srun) or, when
    no launcher set RANK/WORLD_SIZE, as a world of one. `backend`: auto | nccl | gloo."""
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _DropExpected(logging.Filter):
    """Drops DeepSpeed's warning about our (deliberate) client AdamW subclass under ZeRO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's per-step INFO lines and torch's collective deprecation warnings off the console."""
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropExpected) for f in ds_logger.filters):
        ds_logger.addFilter(_DropExpected())
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+ is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


# ---------------------------------------------------------------------------- DeepSpeed config

def resolve_repo_path(path: str | Path) -> Path:
    """An absolute path, a path relative to the working directory, or one relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []


def build_ds_config(cfg: RunConfig, world_size: int, use_cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: `cfg.deepspeed.config` (JSON) with the run settings written over it.

    Set from the run: batch sizes, gradient accumulation and clipping, the ZeRO stage override, bf16
    (GPU only; CPU runs stay fp32), optimizer offload; then `cfg.deepspeed.overrides` merged last.
    The JSON must not define `optimizer` or `scheduler`: both come from the run config.
    """
    s = cfg.deepspeed
    path = resolve_repo_path(s.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {s.config} not found (looked in the working directory and "
                          f"{REPO_ROOT}); use one of ds_configs/*.json")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    for key in ("optimizer", "scheduler"):
        if key in ds or key in s.overrides:
            raise ConfigError(f"deepspeed.config: {path} defines '{key}', but the {key} comes from the run "
                              f"config (optimizer.*, schedule.*); remove it from the DeepSpeed JSON")
    if use_cuda is None:
        use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    zero = dict(ds.get("zero_optimization", {}))
    if s.zero_stage is not None:
        zero["stage"] = s.zero_stage
    zero.setdefault("stage", 0)
    if s.offload_optimizer:
        if zero["stage"] == 0:
            raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage >= 1 (set deepspeed.zero_stage)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_cuda)}
    ds["zero_optimization"] = zero
    bf16 = bool(s.bf16 and use_cuda)
    if s.bf16 and not use_cuda:
        logger.warning("deepspeed.bf16 is ignored on CPU: the run stays fp32")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("deepspeed.config: fp16 is not supported (MoE router and Engram gates need range); "
                          "use deepspeed.bf16")
    ds.pop("fp16", None)
    # A client optimizer (torch AdamW subclass) also under ZeRO-Offload.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    ds = _deep_merge(ds, s.overrides)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"deepspeed.config: {path} leaves {', '.join(left)} as 'auto' and the run settings "
                          "do not fill it; give a value in the JSON or in deepspeed.overrides")
    return ds


# ---------------------------------------------------------------------------- Engram tables

class TableStore(nn.Module):
    """Owns this rank's Engram table rows (one fp32 matrix per Engram layer), outside the module that
    DeepSpeed wraps. `tables["<layer>"]` is the parameter the table optimizer updates: the whole
    [num_rows, dim] table (`replicated`) or this rank's contiguous row range of it (`sharded`, see
    `parallel.table_shard`), on `device` or, with `host=True`, in (pinned) host memory. `views[layer]` is
    the `EngramTable` handed to the model.

    Tables are created directly where they live (never moved afterwards: do not call `.to()` on a store
    with host tables) and initialised by `memory.tables.init_table_rows` from (seed, layer): any layout
    (replicated, sharded over any world size, host or device) starts from the same table.
    """

    def __init__(self, sharding: str = "replicated", host: bool = False, device: torch.device | str = "cpu",
                 group: Any | None = None, ops: Any | None = None, seed: int = 0) -> None:
        super().__init__()
        if sharding not in ("replicated", "sharded"):
            raise ValueError(f"table sharding '{sharding}' (expected replicated or sharded)")
        self.tables = nn.ParameterDict()
        self.views: dict[int, Any] = {}
        self.sharding = sharding
        self.host = host
        self.device = torch.device(device)
        self.group = group
        """Shard group of sharded tables (None: the world)."""
        self.ops = ops
        """Kernel ops (`kernels.get_ops`) for host-tier gathers and updates; None: torch indexing."""
        self.seed = seed

    @property
    def sharded(self) -> bool:
        return self.sharding == "sharded"

    def factory(self, init_std: float, sparse: bool = True) -> Any:
        """A model `table_factory` that creates the table here and hands the model its `EngramTable` view:
        `StoreTable` (replicated, device), `HostTable` (replicated, host) or `ShardedTable`."""
        from ..memory.tables import HostTable, init_table_rows
        from ..parallel.table_shard import ShardedTable

        def make(layer_id: int, num_rows: int, dim: int) -> Any:
            if num_rows <= 0 or dim <= 0:
                raise ValueError(f"engram table of layer {layer_id}: num_rows={num_rows}, dim={dim} must be "
                                 "positive")

            def init(start: int, end: int) -> torch.Tensor:
                return init_table_rows(self.seed, layer_id, num_rows, dim, init_std, start, end)

            table: Any
            if self.sharded:
                table = ShardedTable(num_rows, dim, init, device=self.device, group=self.group,
                                     host=self.host, ops=self.ops if self.host else None)
            elif self.host:
                table = HostTable(num_rows, dim, self.device, init, ops=self.ops)
            else:
                table = StoreTable(nn.Parameter(init(0, num_rows).to(self.device)), sparse=sparse)
            self.tables[str(layer_id)] = table.weight
            self.views[layer_id] = table
            return table

        return make

    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.tables.keys())

    def weight(self, layer: int) -> nn.Parameter:
        """This rank's rows of `layer`'s table (the optimizer's parameter)."""
        return self.tables[str(layer)]

    def table(self, layer: int) -> Any:
        """The `EngramTable` of `layer`."""
        return self.views[layer]

    def row_range(self, layer: int) -> tuple[int, int]:
        """Global rows [start, end) of `layer` held by this rank."""
        view = self.views[layer]
        return (view.row_start, view.row_end) if self.sharded else (0, view.num_rows)

    def writes_rows(self, layer: int, rank: int) -> bool:
        """Whether `rank` writes its rows of `layer` to a checkpoint (each row is written exactly once)."""
        start, end = self.row_range(layer)
        return end > start if self.sharded else rank == 0

    @property
    def num_rows(self) -> int:
        """Rows of all tables (whole tables, whatever this rank holds)."""
        return sum(view.num_rows for view in self.views.values())

    def full_weight(self, layer: int) -> torch.Tensor:
        """The whole table of `layer` on the CPU; collective for sharded tables (export/consolidation)."""
        if self.sharded:
            from ..parallel.table_shard import gather_full_weight

            return gather_full_weight(self.views[layer])
        return self.weight(layer).detach().cpu().clone()

    def prefetch(self, layer: int, flat_row_ids: torch.Tensor) -> None:
        """Start gathering the rows a later lookup of `layer` with the same ids needs (host tier; collective
        when sharded). No-op for device-resident tables."""
        if self.host:
            self.views[layer].prefetch(flat_row_ids)

    def close(self) -> None:
        """Stop the host tier's prefetch threads."""
        for view in self.views.values():
            close = getattr(view, "close", None)
            if close is not None:
                close()


class StoreTable:
    """`EngramTable` view of one `TableStore` parameter. Not an `nn.Module` on purpose: the model keeps it
    as a plain attribute, so the table stays out of `model.parameters()` and out of DeepSpeed."""

    def __init__(self, weight: nn.Parameter, sparse: bool = True) -> None:
        self.weight = weight
        self.sparse = sparse
        self.num_rows, self.dim = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype: torch.dtype | None = None
        """Cast the looked-up rows to this dtype (bf16 runs keep the table itself in fp32)."""

    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        """flat_row_ids: [...] int64 (offsets included) -> rows [..., dim]; sparse row gradient."""
        rows = F.embedding(flat_row_ids, self.weight, sparse=self.sparse)
        return rows if self.compute_dtype is None else rows.to(self.compute_dtype)

    def __repr__(self) -> str:
        return f"StoreTable(num_rows={self.num_rows}, dim={self.dim}, sparse={self.sparse})"


# ---------------------------------------------------------------------------- backbone optimizer

class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step when a gradient is non-finite and says so in `overflow`.

    DeepSpeed's ZeRO optimizers (stages 1-3) already skip a step whose global gradient norm is not finite
    before this optimizer is reached. Without ZeRO, DeepSpeed calls this optimizer directly on the
    all-reduced (hence rank-identical) gradients and reads `overflow` to count a skipped step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overflow = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return None
        return super().step(closure)


def build_backbone_optimizer(model: nn.Module, cfg: RunConfig,
                             ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """Client optimizer over the backbone + Engram dense parameters (the tables are not in the model).

    `adamw`: `GuardedAdamW` over `param_groups_for` (any ZeRO stage). `muon`: `train.muon.Muon` (Muon for the
    hidden matrices, AdamW for the rest), which needs whole matrices: ZeRO stage 0 in fp32 only.
    """
    from .param_groups import param_groups_for

    o = cfg.optimizer
    groups = param_groups_for(model, o)
    for g in groups:
        g.setdefault("lr", o.lr)
        g["base_lr"] = g["lr"]
    groups = split_expert_param_groups(groups)  # expert-parallel params -> DeepSpeed MoE groups (EP > 1)
    betas = (o.betas[0], o.betas[1])
    if o.name == "muon":
        if ds_config["zero_optimization"]["stage"] != 0 or ds_config["bf16"]["enabled"]:
            raise ConfigError("optimizer.name=muon needs whole weight matrices: use deepspeed.zero_stage=0 "
                              "without bf16 (ZeRO and DeepSpeed's bf16 optimizer hand it flat partitions)")
        from .muon import Muon

        return Muon(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum,
                    ns_steps=o.muon_ns_steps, betas=betas, eps=o.eps)
    return GuardedAdamW(groups, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay)


# ---------------------------------------------------------------------------- assembly

@dataclass
class TrainComponents:
    """Everything the trainer steps."""

    cfg: RunConfig
    dist: DistInfo
    engine: Any
    """The DeepSpeed engine wrapping `model`."""
    model: EngramMoEModel
    tables: TableStore
    table_optimizer: Any | None
    """`RowSparseAdam` over the tables (None without Engram)."""
    ds_config: dict[str, Any]
    eod_token_id: int | None = None
    expert_parallel: ExpertParallel | None = None
    """Expert-parallel groups and dispatcher (None when `parallel.ep_size` is 1)."""

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    def row_ids(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return engram_row_ids(self.model, input_ids, self.eod_token_id)

    @property
    def prefetches_tables(self) -> bool:
        """Whether `prefetch_tables` does anything (host-resident tables)."""
        return self.tables.host and bool(self.tables.views)

    def prefetch_tables(self, row_ids: dict[int, torch.Tensor]) -> None:
        """Start gathering the table rows of a later micro-batch with these row ids (from `row_ids`); the
        lookups of that micro-batch then overlap with the compute before them. Collective when sharded."""
        for block in self.model.blocks:
            if block.engram is not None and block.layer_id in row_ids:
                self.tables.prefetch(block.layer_id, row_ids[block.layer_id] + block.engram.head_offsets)


def engram_row_ids(model: EngramMoEModel, input_ids: torch.Tensor,
                   eod_token_id: int | None) -> dict[int, torch.Tensor]:
    """input_ids: [B, T] -> {layer: [B, T, H]} row ids, computed outside the DeepSpeed-wrapped forward.

    Hashing is done here rather than inside `model.forward` so the lookup addresses are plain batch data.
    """
    addresser = model.addresser
    if addresser is None:
        return {}
    segment_ids = None
    if model.config.engram.reset_at_doc_boundary:
        if eod_token_id is None:
            raise ValueError("model.engram.reset_at_doc_boundary needs the dataset's eod_token_id")
        segment_ids = segment_ids_from_eod(input_ids, eod_token_id)
    return addresser.row_ids(input_ids, segment_ids)


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
    from ..memory.addressing import build_addressing

    seed_everything(cfg.train.seed)
    store = table_store_for(cfg, device, table_group)
    addressing = build_addressing(cfg.model, compression) if cfg.model.engram.layers else None
    model = EngramMoEModel(cfg.model, addressing,
                           dispatcher=expert_parallel.dispatcher if expert_parallel is not None else None,
                           table_factory=store.factory(cfg.model.engram.table_init_std, sparse=True))
    if expert_parallel is not None:
        expert_parallel.prepare_model(model)
    return model, store


def table_store_for(cfg: RunConfig, device: torch.device | str = "cpu",
                    table_group: Any | None = None) -> TableStore:
    """The `TableStore` of `cfg.parallel` (table_sharding, host_tables, kernel_backend for the host tier)."""
    p = cfg.parallel
    if p.table_sharding == "sharded" and cfg.model.engram.layers and not dist.is_initialized():
        raise ConfigError("parallel.table_sharding=sharded needs torch.distributed (launch through the "
                          "trainer, torchrun or srun)")
    ops = None
    if p.host_tables:
        from ..kernels import get_ops

        ops = get_ops(p.kernel_backend)
    return TableStore(sharding=p.table_sharding, host=p.host_tables, device=device, group=table_group,
                      ops=ops, seed=cfg.train.seed)


def table_process_group(cfg: RunConfig) -> Any | None:
    """Collective on every rank: the shard group of sharded tables, a group of its own over the whole world
    so the tables' all-to-alls never interleave with DeepSpeed's reductions on one communicator (None when
    the tables are replicated)."""
    if cfg.parallel.table_sharding != "sharded" or not cfg.model.engram.layers:
        return None
    return dist.new_group(ranks=list(range(dist.get_world_size())))


def build_table_optimizer(store: TableStore, cfg: RunConfig) -> Any | None:
    """Row-sparse Adam of the tables: lr x engram_lr_multiplier, engram_weight_decay (paper: 0).

    Replicated tables average the row gradients over the data-parallel ranks (`grad_sync="mean"`); sharded
    tables already received them on the owner (`ShardedTable` divides by the world: the same mean), so each
    rank steps its own rows (`"none"`). Host tables are stepped by the store's kernel ops (C++ sparse Adam
    on the host); replicated host tables exchange their row gradients over a gloo group under NCCL.
    Collective (may create a process group)."""
    if not store.tables:
        return None
    from ..memory.sparse_optim import RowSparseAdam

    o = cfg.optimizer
    params = list(store.tables.values())
    kwargs: dict[str, Any] = dict(lr=o.lr * o.engram_lr_multiplier, betas=(o.betas[0], o.betas[1]), eps=o.eps,
                                  weight_decay=o.engram_weight_decay,
                                  grad_sync="none" if store.sharded else "mean")
    if not store.host:
        return RowSparseAdam(params, process_group=None, **kwargs)
    group = None
    if not store.sharded and dist.is_initialized() and dist.get_backend() == "nccl":
        group = dist.new_group(ranks=list(range(dist.get_world_size())), backend="gloo")
    return RowSparseAdam(params, ops=store.ops, process_group=group, **kwargs)


def build_components(cfg: RunConfig, info: DistInfo, dataset: DatasetDir | None,
                     init_from: str | None = None) -> TrainComponents:
    """Model + tables + DeepSpeed engine + table optimizer for this rank; with `init_from` (a Hugging Face
    export or training checkpoint) the model and tables start from its weights (`checkpoint.init_from`)."""
    import deepspeed

    quiet_deepspeed()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.data.engram_sidecar and info.rank == 0:
        logger.warning("data.engram_sidecar: the trainer hashes row ids on device (bit-identical to the "
                       "sidecar); precomputed rows are not read yet")
    ds_config = build_ds_config(cfg, info.world_size, use_cuda=info.device.type == "cuda")
    zero_stage = int(ds_config["zero_optimization"]["stage"])
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


def set_learning_rates(c: TrainComponents, multiplier: float) -> tuple[float, float]:
    """Write `base_lr x multiplier` into every backbone group and the table optimizer's LR.

    Returns (backbone peak-relative LR, table LR)."""
    o = c.cfg.optimizer
    for g in c.engine.optimizer.param_groups:
        g["lr"] = g.get("base_lr", o.lr) * multiplier
    return o.lr * multiplier, o.lr * o.engram_lr_multiplier * multiplier


def consolidated_state_dict(c: TrainComponents) -> dict[str, torch.Tensor]:
    """Full CPU state dict of the model *with* its tables under `blocks.<L>.engram.table.weight` (the names of
    a model built with `LocalEngramTable`s). Collective under ZeRO-3 (parameters are gathered), with
    expert parallelism (all routed experts gathered over the EP group) and with sharded tables (every rank
    gets the whole tables)."""
    import deepspeed

    from .checkpoint import table_weight_name

    params = list(c.model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=c.zero_stage == 3):
        state = {k: v.detach().cpu().clone() for k, v in c.model.state_dict().items()}
    if c.expert_parallel is not None:
        state.update(c.expert_parallel.full_expert_state(c.model))
    for layer in c.tables.layers():
        state[table_weight_name(layer)] = c.tables.full_weight(layer)
    return state
