"""Training and validation batches: rank slices of global micro-batches drawn from a global sample counter.

Global micro-batch g holds the global samples ``[c, c + B * W)`` with ``c = consumed_samples`` (``g * B * W``
when B and W never change); rank r takes its ``B`` contiguous samples ``[c + r * B, c + (r + 1) * B)``.
Everything a loader needs to continue is that counter, so ``state_dict()`` is a few integers and a
restored loader yields bit-for-bit the batches the uninterrupted one would have, mid-epoch or not. It
also continues from the same global sample after a change of world size or micro-batch size.

A batch is ``{"input_ids": LongTensor [B, T], "labels": LongTensor [B, T]}`` with labels the next tokens
(no masking across packed document boundaries). The Engram document-boundary reset is not part of the
batch: the trainer derives it from the batch with
``engram_pretrain.model.engram_hash.segment_ids_from_eod(input_ids, eod_token_id)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .blending import BlendedSamples, SampleSource
from .packed import PackedSamples

if TYPE_CHECKING:
    from ..config import RunConfig
    from .dataset_dir import DatasetDir

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
CACHE_DIR_NAME = ".index_cache"


def _batch(samples: SampleSource, start: int, size: int) -> dict[str, torch.Tensor]:
    """Samples [start, start + size) as input_ids / labels LongTensors [size, T]."""
    rows = np.stack([samples[start + j] for j in range(size)]).astype(np.int64, copy=False)  # [B, T + 1]
    tokens = torch.from_numpy(rows)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def _check_layout(micro_batch_size: int, rank: int, world_size: int) -> None:
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")


class TrainBatches:
    """Unbounded iterator of this rank's training micro-batches; resumable from ``state_dict()``."""

    def __init__(self, samples: SampleSource, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 consumed_samples: int = 0) -> None:
        _check_layout(micro_batch_size, rank, world_size)
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.consumed_samples = consumed_samples  # global samples handed out to all ranks so far

    @property
    def global_batch_size(self) -> int:
        """Samples of one global micro-batch: micro_batch_size x world_size."""
        return self.micro_batch_size * self.world_size

    @property
    def seq_len(self) -> int:
        return self.samples.seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """This rank's slice of the next global micro-batch: input_ids, labels [B, T]."""
        batch = _batch(self.samples, self.consumed_samples + self.rank * self.micro_batch_size,
                       self.micro_batch_size)
        self.consumed_samples += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position (identical on every rank): plain ints, safe to JSON/torch.save."""
        return {"format": STATE_FORMAT, "consumed_samples": self.consumed_samples,
                "micro_batch_size": self.micro_batch_size, "world_size": self.world_size,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the ``consumed_samples`` of ``state`` (other layouts are allowed, with a note)."""
        if state.get("format") != STATE_FORMAT or "consumed_samples" not in state:
            raise ValueError(f"not a TrainBatches state (format {state.get('format')!r}, expected "
                             f"{STATE_FORMAT} with consumed_samples)")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        was = (state.get("micro_batch_size"), state.get("world_size"), state.get("seq_len"))
        if was != (self.micro_batch_size, self.world_size, self.seq_len):
            logger.warning("data loader resumes at global sample %d with (micro_batch_size, world_size, "
                           "seq_len) = %s (saved with %s)", consumed,
                           (self.micro_batch_size, self.world_size, self.seq_len), was)
        self.consumed_samples = consumed


class ValidBatches:
    """A fixed list of ``num_batches`` validation micro-batches per rank, identical on every iteration.

    Global micro-batch g holds samples ``[g * B * W, (g + 1) * B * W)`` of an unshuffled source; a source
    shorter than that wraps around to its start.
    """

    def __init__(self, samples: SampleSource, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 num_batches: int = 8) -> None:
        _check_layout(micro_batch_size, rank, world_size)
        if num_batches <= 0:
            raise ValueError(f"num_batches must be positive, got {num_batches}")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b, w = self.micro_batch_size, self.world_size
        for g in range(self.num_batches):
            yield _batch(self.samples, g * b * w + self.rank * b, b)


# ---------------------------------------------------------------------- from the run config

def _open_dataset_dirs(paths: list[str]) -> list[DatasetDir]:
    from .dataset_dir import DatasetDir

    dirs = []
    for i, p in enumerate(paths):
        try:
            dirs.append(DatasetDir(p))
        except (OSError, ValueError) as err:
            raise ValueError(f"data.paths[{i}] = {p!r} is not a usable dataset directory: {err}") from err
    return dirs


def _check_compatible(cfg: RunConfig, dirs: list[DatasetDir]) -> None:
    """Same tokenizer everywhere, and a model vocabulary that covers every token id."""
    paths = cfg.data.paths
    first = dirs[0].metadata.get("tokenizer_fingerprint")
    for p, d in zip(paths[1:], dirs[1:], strict=True):
        fp = d.metadata.get("tokenizer_fingerprint")
        if fp != first:
            raise ValueError(f"data.paths mixes tokenizers: {p!r} has tokenizer fingerprint {fp!r} but "
                             f"{paths[0]!r} has {first!r}; blend only datasets prepared with one tokenizer")
    for p, d in zip(paths, dirs, strict=True):
        if d.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                             f"dataset {p!r} ({d.vocab_size} tokens); set model.vocab_size >= {d.vocab_size}")


def _split_samples(cfg: RunConfig, dirs: list[DatasetDir], split: str, seed: int | None
                   ) -> list[PackedSamples]:
    out = []
    for p, d in zip(cfg.data.paths, dirs, strict=True):
        if split not in d.metadata.get("splits", {}):
            raise ValueError(f"dataset {p!r} has no {split!r} split"
                             + ("; set train.eval_interval=0 to train without validation" if split == "valid"
                                else ""))
        try:
            out.append(PackedSamples(d.split(split), cfg.data.seq_len, seed,
                                     cache_dir=Path(p) / CACHE_DIR_NAME))
        except ValueError as err:
            raise ValueError(f"{split} split of dataset {p!r}: {err}") from err
    return out


def _blend(sources: list[PackedSamples], weights: list[float]) -> SampleSource:
    return sources[0] if len(sources) == 1 else BlendedSamples(sources, weights)


def build_loaders(cfg: RunConfig, rank: int, world_size: int
                  ) -> tuple[TrainBatches, ValidBatches | None, DatasetDir]:
    """Train and validation loaders of this rank, and the first dataset directory (tokenizer, EOD, map).

    Train: the train splits of ``cfg.data.paths`` (dataset directories), each packed and shuffled with
    ``cfg.data.seed``, blended by ``cfg.data.weights`` (equal when None). Valid: their valid splits,
    unshuffled, blended with the same weights, ``cfg.train.eval_batches`` micro-batches per evaluation;
    None when validation is disabled (``train.eval_interval`` or ``train.eval_batches`` is 0). Index
    caches live in ``<dataset dir>/.index_cache`` and are built once for all ranks.
    """
    d, t = cfg.data, cfg.train
    if not d.paths:
        raise ValueError("data.paths is empty: name at least one dataset directory written by data_prep")
    dirs = _open_dataset_dirs(list(d.paths))
    _check_compatible(cfg, dirs)
    weights = list(d.weights) if d.weights is not None else [1.0] * len(dirs)
    if len(weights) != len(dirs):
        raise ValueError(f"data.weights has {len(weights)} entries for {len(dirs)} data.paths")
    train_sources = _split_samples(cfg, dirs, "train", d.seed)
    train = TrainBatches(_blend(train_sources, weights), t.micro_batch_size, rank, world_size)
    valid = None
    if t.eval_interval > 0 and t.eval_batches > 0:
        valid_sources = _split_samples(cfg, dirs, "valid", None)
        valid = ValidBatches(_blend(valid_sources, weights), t.micro_batch_size, rank, world_size,
                             t.eval_batches)
    if rank == 0:
        _log_summary(cfg, train_sources, weights, world_size)
    return train, valid, dirs[0]


def _log_summary(cfg: RunConfig, sources: list[PackedSamples], weights: list[float], world_size: int) -> None:
    t = cfg.train
    total = t.steps * t.grad_accum_steps * t.micro_batch_size * world_size  # samples the run consumes
    wsum = sum(weights)
    for p, s, w in zip(cfg.data.paths, sources, weights, strict=True):
        epochs = total * w / wsum / s.samples_per_epoch
        logger.info("data %s: %d documents, %d tokens, %d samples/epoch of %d tokens, weight %.3f, "
                    "%.2f epochs over the run", p, s.num_documents, s.num_tokens, s.samples_per_epoch,
                    cfg.data.seq_len + 1, w / wsum, epochs)
