"""Trainer callbacks: everything around the optimizer step (evaluation, metrics, console and sink logging,
checkpoints, signal handling), so that `Trainer.fit` reads as the loop it is.

Hooks, called on every rank in the order of `Trainer.callbacks` (`post_train` in reverse), at the same
point of the run, so a hook may run collectives:

    pre_train(trainer)            once, before the first step of `fit`
    pre_step(trainer)             before each optimizer step
    post_step(trainer, stats)     after each optimizer step (`trainer.step` already counts it)
    log(trainer, record)          a metrics record of `trainer.step` (`Trainer.emit`)
    post_train(trainer)           once, when `fit` returns or raises

`default_callbacks()` is the trainer's standard set; `Trainer(..., callbacks=[...])` appends more (e.g. a
profiler, an early stop that sets `trainer.stopped`).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from .metrics import console_line, load_stats, memory_stats, mfu, peak_flops

if TYPE_CHECKING:
    from .loop import StepStats, Trainer

logger = logging.getLogger(__name__)


class Callback:
    """Base class: every hook does nothing."""

    def pre_train(self, trainer: Trainer) -> None:
        del trainer

    def pre_step(self, trainer: Trainer) -> None:
        del trainer

    def post_step(self, trainer: Trainer, stats: StepStats) -> None:
        del trainer, stats

    def log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        del trainer, record

    def post_train(self, trainer: Trainer) -> None:
        del trainer


class StopRequest:
    """SIGTERM / SIGUSR1 handler: remembers the signal; the trainer acts at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class SignalHandling(Callback):
    """Installs `trainer.stop_request` for the run; the step's all-reduce carries the flag to every rank."""

    def pre_train(self, trainer: Trainer) -> None:
        trainer.stop_request.install()

    def post_train(self, trainer: Trainer) -> None:
        trainer.stop_request.restore()


class Evaluation(Callback):
    """Validation loss every `train.eval_interval` steps and at the last step, into `trainer.val_losses`."""

    def post_step(self, trainer: Trainer, stats: StepStats) -> None:
        t = trainer.cfg.train
        if t.eval_interval > 0 and (trainer.step % t.eval_interval == 0 or trainer.step == t.steps):
            val = trainer.evaluate()
            if val is not None:
                trainer.val_losses[trainer.step] = val


class Metrics(Callback):
    """Training metrics over the steps since the last record: loss, LR, gradient norm, throughput, MFU from
    activated parameters, MoE loads and biases per layer, Engram gates and rows touched per layer, memory.
    A record is emitted at log steps (`train.log_interval`) and with every validation loss."""

    def __init__(self) -> None:
        self.window: list[StepStats] = []
        self.activated_params = 0
        self.peak_flops = 0.0
        self.peak_label = ""

    def pre_train(self, trainer: Trainer) -> None:
        from ..analysis.params import count_parameters

        parts = trainer.components
        self.activated_params = count_parameters(trainer.cfg.model).activated_with_head
        self.peak_flops, self.peak_label = peak_flops(parts.engine.device,
                                                      bool(parts.ds_config["bf16"]["enabled"]))
        if parts.dist.rank == 0:
            logger.info("training %s from step %d to %d: %d tokens/step, %d activated params (MFU peak: %s)",
                        trainer.cfg.name, trainer.step, trainer.cfg.train.steps, trainer.tokens_per_step(),
                        self.activated_params, self.peak_label)

    def post_step(self, trainer: Trainer, stats: StepStats) -> None:
        self.window.append(stats)
        val = trainer.val_losses.get(trainer.step)
        if trainer.is_log_step(trainer.step) or val is not None:
            window, self.window = self.window, []
            trainer.emit(self.record(trainer, window, val))

    def record(self, trainer: Trainer, window: list[StepStats], val_loss: float | None) -> dict[str, Any]:
        parts = trainer.components
        last = window[-1]
        losses = [s.loss for s in window if not s.skipped]
        seconds = sum(s.seconds for s in window)
        tps = len(window) * trainer.tokens_per_step() / seconds if seconds > 0 else 0.0
        moe, maxvios = {}, []
        moe_ids = [b.layer_id for b in parts.model.blocks if b.is_moe]
        for layer_id, m, load in zip(moe_ids, parts.model.moe_layers(), last.loads, strict=False):
            st = load_stats(load)
            bias = m.router.expert_bias
            maxvios.append(st["maxvio"])
            moe[f"layer{layer_id}"] = {**st, "bias_min": float(bias.min()), "bias_max": float(bias.max())}
        engram, gates = {}, []
        for block in parts.model.blocks:
            if block.engram is not None and block.engram.last_gate_mean is not None:
                g = block.engram.last_gate_mean.float().cpu()
                gates.append(float(g.mean()))
                engram[f"layer{block.layer_id}"] = {
                    "gate_mean": {f"branch{j}": float(v) for j, v in enumerate(g)},
                    "rows_touched": last.rows_touched.get(block.layer_id, 0)}
        return {
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "val_loss": val_loss, "lr": last.lr, "engram_lr": last.table_lr, "grad_norm": last.grad_norm,
            "tokens_per_s": tps, "step_seconds": seconds / len(window),
            "mfu": mfu(self.activated_params, tps, self.peak_flops, parts.dist.world_size),
            "tokens_seen": trainer.tokens_seen, "skipped_steps": trainer.skipped_steps,
            "maxvio": max(maxvios) if maxvios else None,
            "engram_gate": sum(gates) / len(gates) if gates else None,
            "moe": moe, "engram": engram, "memory": memory_stats(parts.engine.device)}


class ConsoleLog(Callback):
    """Rank 0 prints one line per training-metrics record."""

    def log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.components.dist.rank == 0 and "loss" in record:
            logger.info(console_line(trainer.step, trainer.cfg.train.steps, record))


class SinkLog(Callback):
    """Every record into `trainer.sink` (metrics.jsonl, TensorBoard, W&B)."""

    def log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.sink is not None:
            trainer.sink.write(trainer.step, record)


class Checkpointing(Callback):
    """Saves every `checkpoint.interval` steps and at the last step; on a stop signal (or `fit(stop_at=)`)
    saves at once and ends the run (`trainer.stopped`)."""

    def post_step(self, trainer: Trainer, stats: StepStats) -> None:
        step = trainer.step
        if stats.stop or step == trainer.stop_at:
            if trainer.components.dist.rank == 0:
                logger.warning("stop requested: saving at step %d and exiting", step)
            if trainer.last_saved_step != step:
                trainer.save()
            trainer.stopped = True
            return
        interval = trainer.cfg.checkpoint.interval
        if ((interval > 0 and step % interval == 0) or step == trainer.cfg.train.steps) \
                and trainer.last_saved_step != step:
            trainer.save()


def default_callbacks() -> list[Callback]:
    """The trainer's standard callbacks, in hook order: signals, evaluation, metrics, console, sink,
    checkpoints (a step's validation loss is in its metrics record; the save comes last)."""
    return [SignalHandling(), Evaluation(), Metrics(), ConsoleLog(), SinkLog(), Checkpointing()]
