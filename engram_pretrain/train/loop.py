"""The training loop: micro-batches through the DeepSpeed engine, the table step, balancing, eval, saves.

One optimizer step:

1. set every group's LR from `lr_multiplier(step)` (tables: x `engram_lr_multiplier`);
2. for each of `grad_accum_steps` micro-batches: Engram row ids from the batch, `engine(...)`,
   `engine.backward(loss)`, `engine.step()` (DeepSpeed steps the backbone at the accumulation boundary);
   with host-resident tables the next micro-batch's rows are prefetched during the current one;
3. one all-reduce of [loss, non-finite flag, stop flag, per-expert loads] over the world, on the training
   device (what NCCL needs; the micro-batches add to device totals without a host sync);
4. if the step was applied: `RowSparseAdam.step` on the tables (rows exchanged across ranks) and the
   loss-free bias update from the global-batch loads; otherwise discard the table gradients and loads.

Non-finite policy: a micro-batch with a non-finite loss has its backward multiplied by NaN so that every
rank's gradient norm is NaN, which makes DeepSpeed skip the step everywhere (ZeRO >= 1 checks the norm;
without ZeRO `GuardedAdamW` does). Skipped steps are counted; `train.max_nonfinite_steps` of them in a
row raise `NonFiniteError` (exit code 3).

Signals: SIGTERM and SIGUSR1 set a flag; at the next step boundary (all ranks agree through the
all-reduce) the trainer saves a checkpoint and returns; the CLI exits with code 0.

Around the step, `train.callbacks` does the rest (evaluation, metrics, logging, checkpoints, signals).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import RunConfig, dump_config, to_dict
from ..kernels.builder import OpBuildError
from .callbacks import Callback, StopRequest, default_callbacks
from .checkpoint import Checkpointer, SaveReport, checkpoint_dir, resolve_resume
from .components import TrainComponents, set_learning_rates
from .metrics import MetricsSink

logger = logging.getLogger(__name__)

EXIT_OK = 0
"""Training finished, or stopped by SIGTERM/SIGUSR1 after writing a checkpoint."""
EXIT_CONFIG = 2
"""Bad configuration or data (nothing was trained)."""
EXIT_NONFINITE = 3
"""Aborted after `train.max_nonfinite_steps` consecutive non-finite steps."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class StepStats:
    """What one optimizer step produced (global values, identical on every rank)."""

    loss: float
    skipped: bool
    stop: bool
    grad_norm: float | None
    lr: float
    table_lr: float
    seconds: float
    loads: list[torch.Tensor]
    rows_touched: dict[int, int] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Outcome of `Trainer.fit`."""

    step: int
    losses: list[float]
    """Global mean training loss of every step run by this call (NaN for skipped ones)."""
    val_losses: dict[int, float]
    stopped_early: bool
    """Stopped before `train.steps` by SIGTERM/SIGUSR1 (or `fit(stop_at=...)`), after a checkpoint."""
    skipped_steps: int
    last_checkpoint: Path | None
    seconds: float


class Trainer:
    """Runs `cfg.train.steps` optimizer steps over `train_batches`, with eval, logging and checkpoints."""

    def __init__(self, components: TrainComponents, train_batches: Any, valid_batches: Any | None,
                 checkpointer: Checkpointer | None, sink: MetricsSink | None = None,
                 callbacks: list[Callback] | None = None) -> None:
        self.components = components
        self.cfg: RunConfig = components.cfg
        self.train_batches = train_batches
        self.valid_batches = valid_batches
        self.checkpointer = checkpointer
        self.sink = sink
        self.callbacks: list[Callback] = [*default_callbacks(), *(callbacks or [])]
        """Hooks around the steps (`train.callbacks`): the defaults, then `callbacks`."""
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.tokens_seen = 0
        self.stop_request = StopRequest()
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.init_from: str | None = None
        """The `checkpoint.init_from` source this run started from (kept through resumes)."""
        # state of the current `fit`
        self.stop_at: int | None = None
        self.stopped = False
        """Set by a callback to end `fit` after the current step."""
        self.losses: list[float] = []
        self.val_losses: dict[int, float] = {}

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict[str, Any]:
        return {"data": self.train_batches.state_dict(), "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "tokens_seen": self.tokens_seen,
                "init_from": self.init_from}

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint written by `save`."""
        if self.checkpointer is None:
            raise ValueError("restore needs a Checkpointer")
        state = self.checkpointer.load(self.components, path)
        self.step = int(state["step"])
        self.train_batches.load_state_dict(state["data"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.init_from = state.get("init_from")
        self.last_saved_step = self.step
        self.last_checkpoint = Path(path)
        if self.components.dist.rank == 0:
            logger.info("resumed from %s at step %d (global sample %d)", path, self.step,
                        state["data"].get("consumed_samples", -1))

    def save(self) -> SaveReport | None:
        if self.checkpointer is None:
            return None
        report = self.checkpointer.save(self.components, self.step, self.trainer_state())
        self.last_saved_step, self.last_checkpoint = self.step, report.path
        if self.components.dist.rank == 0:
            logger.info("checkpoint %s: %.2f MB in %.2f s", report.path, report.num_bytes / 1e6,
                        report.seconds)
        self.emit({"checkpoint": {"bytes": report.num_bytes, "save_seconds": report.seconds}})
        return report

    # ------------------------------------------------------------------ one step

    def train_step(self) -> StepStats:
        """One optimizer step and its bookkeeping (step counter, skip counters); collective on all ranks.

        Raises `NonFiniteError` after `train.max_nonfinite_steps` skipped steps in a row."""
        t = self.cfg.train
        stats = self._optimizer_step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step()
        if not stats.skipped:
            self.nonfinite_in_a_row = 0
            return stats
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.components.dist.rank == 0:
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step,
                           self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} consecutive steps (up to step {self.step}) had a non-finite loss "
                f"or gradient (train.max_nonfinite_steps={t.max_nonfinite_steps}); aborting. Last "
                f"checkpoint: {self.last_checkpoint}. Lower optimizer.lr, check the data, or resume from an "
                "earlier checkpoint.")
        return stats

    def _optimizer_step(self) -> StepStats:
        """One optimizer step over `grad_accum_steps` micro-batches (collective on all ranks)."""
        from .schedule import lr_multiplier

        c, cfg = self.components, self.cfg
        engine, device = c.engine, c.device
        start = time.perf_counter()
        lr, table_lr = set_learning_rates(c, lr_multiplier(self.step, cfg.train.steps, cfg.schedule))
        skipped_before = engine.skipped_steps
        # step totals stay on the training device (NCCL reduces device tensors only; no host sync per
        # micro-batch): [loss sum, non-finite micro-batches]
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        micro = [next(self.train_batches) for _ in range(cfg.train.grad_accum_steps)]
        ahead = self._prefetch(micro[0]) if c.prefetches_tables else None
        for i, batch in enumerate(micro):
            input_ids = batch["input_ids"].to(device)  # [B, T]
            labels = batch["labels"].to(device)  # [B, T]
            row_ids = ahead if ahead is not None else c.row_ids(input_ids)
            # host tables: the next micro-batch's rows are gathered in the background during this one
            ahead = self._prefetch(micro[i + 1]) if c.prefetches_tables and i + 1 < len(micro) else None
            out = engine(input_ids, labels=labels, engram_row_ids=row_ids)
            finite = torch.isfinite(out.loss)
            # a non-finite loss backpropagates NaN: every rank's gradient norm is NaN -> DeepSpeed skips
            loss = out.loss * torch.where(finite, 1.0, float("nan"))  # a constant factor: exact when 1
            totals[0] += out.lm_loss.detach().double()
            totals[1] += (~finite).double()
            engine.backward(loss)
            engine.step()
        applied_by_engine = engine.skipped_steps == skipped_before
        moes = c.model.moe_layers()
        stopping = float(self.stop_request.signum is not None)
        stop = torch.full((1,), stopping, dtype=torch.float64, device=device)
        packed = torch.cat([totals, stop] + [m.load_accum.detach().double().to(device) for m in moes])
        dist.all_reduce(packed)  # one collective of the step, on the training device
        norm = engine.get_global_grad_norm()  # global already (a device tensor under ZeRO, or a float)
        if torch.is_tensor(norm):  # copied with the totals: one device-to-host copy per step
            packed = torch.cat([packed, norm.detach().reshape(1).to(packed)])
        packed = packed.cpu()
        if torch.is_tensor(norm):
            norm, packed = float(packed[-1]), packed[:-1]
        world = c.dist.world_size
        mean_loss = float(packed[0]) / (cfg.train.grad_accum_steps * world)
        skipped = bool(packed[1] > 0) or not applied_by_engine
        if bool(packed[1] > 0) and applied_by_engine:
            logger.error("step %d: non-finite loss but DeepSpeed applied the step", self.step)
        loads = list(packed[3:].split([m.num_experts for m in moes])) if moes else []
        rows_touched = self._rows_touched() if self.is_log_step(self.step + 1) else {}
        if not skipped:
            if c.table_optimizer is not None:
                c.table_optimizer.step(table_lr)
            c.model.update_moe_biases([ld.float() for ld in loads] if moes else None)
        else:
            for m in moes:
                m.load_accum.zero_()
        if c.table_optimizer is not None:
            c.table_optimizer.zero_grad()
        norm = None if norm is None else float(norm)
        return StepStats(loss=mean_loss if not skipped else float("nan"), skipped=skipped,
                         stop=bool(packed[2] > 0), grad_norm=norm, lr=lr, table_lr=table_lr,
                         seconds=time.perf_counter() - start, loads=loads, rows_touched=rows_touched)

    def _prefetch(self, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Row ids of `batch`, whose table rows start gathering now (host tables; collective if sharded)."""
        row_ids = self.components.row_ids(batch["input_ids"].to(self.components.device))
        self.components.prefetch_tables(row_ids)
        return row_ids

    def _rows_touched(self) -> dict[int, int]:
        """Distinct table rows with a gradient on this rank in the current step, per Engram layer."""
        out = {}
        for layer in self.components.tables.layers():
            grad = self.components.tables.weight(layer).grad
            if grad is None:
                out[layer] = 0
            elif grad.is_sparse:
                out[layer] = int(torch.unique(grad._indices()[0]).numel())
            else:
                out[layer] = int((grad != 0).any(dim=1).sum())
        return out

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation LM loss over `eval_batches` micro-batches per rank, averaged over all ranks."""
        if self.valid_batches is None:
            return None
        c = self.components
        c.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=c.device)  # [loss sum, batches]
        for batch in self.valid_batches:
            input_ids = batch["input_ids"].to(c.device)
            out = c.engine(input_ids, labels=batch["labels"].to(c.device),
                           engram_row_ids=c.row_ids(input_ids))
            total[0] += out.lm_loss.detach().double()
            total[1] += 1.0
        c.engine.train()
        dist.all_reduce(total)  # on the training device (NCCL has no CPU tensors)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ helpers of the callbacks

    def is_log_step(self, step: int) -> bool:
        n = self.cfg.train.log_interval
        return n > 0 and (step % n == 0 or step == self.cfg.train.steps)

    def tokens_per_step(self) -> int:
        t, world = self.cfg.train, self.components.dist.world_size
        return t.micro_batch_size * t.grad_accum_steps * self.cfg.data.seq_len * world

    def emit(self, record: dict[str, Any]) -> None:
        """Hand a record of the current step to every callback's `log`."""
        for callback in self.callbacks:
            callback.log(self, record)

    # ------------------------------------------------------------------ the run

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until `cfg.train.steps` or until a callback stops the run (a stop signal: checkpoint, then
        return). `stop_at`: behave as if a stop signal arrived during that step; the LR schedule still spans
        `cfg.train.steps`."""
        start = time.perf_counter()
        self.stop_at, self.stopped, self.losses, self.val_losses = stop_at, False, [], {}
        for callback in self.callbacks:
            callback.pre_train(self)
        try:
            while self.step < self.cfg.train.steps and not self.stopped:
                for callback in self.callbacks:
                    callback.pre_step(self)
                stats = self.train_step()
                self.losses.append(stats.loss)
                for callback in self.callbacks:
                    callback.post_step(self, stats)
        finally:
            for callback in reversed(self.callbacks):
                callback.post_train(self)
        return TrainResult(step=self.step, losses=self.losses, val_losses=self.val_losses,
                           stopped_early=self.stopped, skipped_steps=self.skipped_steps,
                           last_checkpoint=self.last_checkpoint, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------- entry point

def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO of this package to stdout; other ranks and other libraries only warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    logging.getLogger("engram_pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_trainer(cfg: RunConfig, resume: str | None = "auto") -> Trainer:
    """Everything for one rank of a run (initialises the process group if needed); resumes when asked."""
    from ..data.loader import build_loaders
    from .distributed import init_distributed
    from .engine import build_components

    info = init_distributed(cfg.launcher.backend)
    train_batches, valid_batches, dataset = build_loaders(cfg, info.rank, info.world_size)
    ckpt_dir = checkpoint_dir(cfg)
    path = resolve_resume(resume, ckpt_dir)
    if path is not None and cfg.checkpoint.init_from:
        why = _initial_checkpoint_mismatch(path, cfg, info.world_size)
        if why is not None:  # step 0 holds nothing but the init_from weights: load them in this layout
            if info.rank == 0:
                logger.info("%s was written from checkpoint.init_from %s with %s: loading the weights "
                            "from there instead", path, cfg.checkpoint.init_from, why)
            path = None
    init_from = cfg.checkpoint.init_from if path is None else None
    components = build_components(cfg, info, dataset, init_from=init_from)
    checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, info.rank, info.world_size)
    log_cfg = cfg.logging
    sink = MetricsSink(cfg.output_dir, info.rank, jsonl=log_cfg.jsonl, tensorboard=log_cfg.tensorboard,
                       wandb=log_cfg.wandb, wandb_project=log_cfg.wandb_project, run_name=cfg.name,
                       config=to_dict(cfg))
    trainer = Trainer(components, train_batches, valid_batches, checkpointer, sink)
    trainer.init_from = init_from
    if path is not None:
        trainer.restore(path)
        if cfg.checkpoint.init_from and info.rank == 0:
            logger.info("checkpoint.init_from %s not used: resuming this run", cfg.checkpoint.init_from)
    elif info.rank == 0:
        fresh = f"the weights of {init_from}" if init_from else "a fresh initialisation"
        where = f"no complete checkpoint in {ckpt_dir}" if resume == "auto" else "not resuming"
        logger.info("%s: starting from %s", where, fresh)
    return trainer


def _initial_checkpoint_mismatch(path: Path, cfg: RunConfig, world_size: int) -> str | None:
    """Why the step-0 checkpoint `path`, written by a run started from `checkpoint.init_from` (e.g. by
    `engram-pretrain import` on one process), cannot be resumed in this run's layout; None when it can (or
    when it is not such a checkpoint)."""
    from .checkpoint import checkpoint_ep_size, read_trainer_state
    from .ds_config import build_ds_config

    state = read_trainer_state(path)
    if int(state.get("step", -1)) != 0 or not state.get("init_from"):
        return None
    stage = int(build_ds_config(cfg, world_size)["zero_optimization"]["stage"])
    if int(state.get("zero_stage", 0)) != stage:
        return f"ZeRO stage {state.get('zero_stage')} (this run: {stage})"
    if int(state["world_size"]) != world_size and stage > 0:
        return f"{state['world_size']} rank(s) (this run: {world_size})"
    if (saved_ep := checkpoint_ep_size(path)) != cfg.parallel.ep_size:
        return f"ep_size {saved_ep} (this run: {cfg.parallel.ep_size})"
    return None


def run_training(cfg: RunConfig, resume: str | None = "auto") -> int:
    """`engram-pretrain train`: train one run on this process's rank; returns the exit code
    (`EXIT_OK`, `EXIT_CONFIG`, `EXIT_NONFINITE`)."""
    from .distributed import init_distributed

    info = init_distributed(cfg.launcher.backend)
    setup_logging(info.rank)
    trainer = None
    try:
        if info.rank == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            dump_config(cfg, Path(cfg.output_dir) / "config.yaml")
        try:
            trainer = build_trainer(cfg, resume)
        except (ValueError, OpBuildError) as err:  # bad config, data, checkpoint; an op that cannot build
            logger.error("error: %s", err)
            return EXIT_CONFIG
        try:
            result = trainer.fit()
        except NonFiniteError as err:
            logger.error("%s", err)
            return EXIT_NONFINITE
        if info.rank == 0:
            how = "stopped by signal" if result.stopped_early else "finished"
            last_val = f"{list(result.val_losses.values())[-1]:.4f}" if result.val_losses else "-"
            final = result.losses[-1] if result.losses else math.nan
            logger.info("%s at step %d in %.1f s: last loss %.4f, last val loss %s, checkpoint %s", how,
                        result.step, result.seconds, final, last_val, result.last_checkpoint)
        return EXIT_OK
    finally:
        if trainer is not None and trainer.sink is not None:
            trainer.sink.close()
        if dist.is_initialized():
            dist.destroy_process_group()
