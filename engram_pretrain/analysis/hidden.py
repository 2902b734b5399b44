"""Models and hidden states for the analyses: load a model, iterate a split, pick tokens, collect layers.

Representations are the model's own `output_hidden_states`: the embedding (layer 0) and every block output
(layers 1..L), each collapsed from the M residual streams to [B, T, D] by the learned head collapse, the
collapse the LM head reads (docs/model.md rules M8 and A1). Both models of a comparison see the same input
ids and the same selected positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.dataset_dir import DatasetDir
from ..data.packed import PackedSamples
from ..model.transformer import EngramMoEModel
from ..train.checkpoint import checkpoint_state_dict, resolve_checkpoint

# ----------------------------------------------------------------------------- models


def load_checkpoint_model(step_dir: str | Path, dataset: DatasetDir | None = None) -> EngramMoEModel:
    """The model of a training checkpoint (`step_<N>/`) with local Engram tables, on the CPU, fp32.

    Only the `model` section of the checkpoint's `config.yaml` is read. The addressing is rebuilt from it
    and, when the model hashes compressed ids, `dataset`'s compression map; the checkpoint's own addresser
    buffers are then loaded over it (and checked against the dataset by `check_compatible`).
    """
    from ..config import from_dict, read_yaml_tree
    from ..memory.addressing_builder import build_addressing
    from ..model.config import ModelConfig

    step_dir = Path(step_dir)
    cfg = from_dict(ModelConfig, read_yaml_tree(step_dir / "config.yaml").get("model", {}), "model.")
    addressing = None
    if cfg.engram.layers:
        compression = None
        if cfg.engram.token_compression:
            if dataset is None:
                raise ValueError(f"{step_dir}: the model hashes compressed token ids; pass the dataset "
                                 "directory (--data) whose compression map it was trained with")
            compression = dataset.compression_map()
        addressing = build_addressing(cfg, compression)
    model = EngramMoEModel(cfg, addressing)
    model.load_state_dict(checkpoint_state_dict(step_dir))
    return model


def load_model(path: str | Path, dataset: DatasetDir | None = None) -> EngramMoEModel:
    """An evaluation-mode fp32 CPU model from an exported Hugging Face folder (`config.json`), a checkpoint
    `step_<N>/` directory, a checkpoint directory or a run directory (latest complete checkpoint).
    With `dataset`, checks that the model can read its tokens (`check_compatible`)."""
    p = Path(path)
    if (p / "config.json").is_file():
        from ..export.importer import load_model as load_exported

        model = load_exported(p)
    else:
        step = resolve_checkpoint(p)
        if step is None:
            raise ValueError(f"{p}: neither an exported Hugging Face folder (config.json) nor a complete "
                             "training checkpoint (step_<N>/ with a 'complete' marker), a checkpoint "
                             "directory or a run directory holding one")
        model = load_checkpoint_model(step, dataset)
    model.eval()
    if dataset is not None:
        check_compatible(model, dataset)
    return model


def check_compatible(model: EngramMoEModel, dataset: DatasetDir) -> None:
    """ValueError unless the model's vocabulary covers the dataset's and it hashes with the dataset's
    compression map."""
    cfg = model.config
    if dataset.vocab_size > cfg.vocab_size:
        raise ValueError(f"{dataset.path}: tokenizer has {dataset.vocab_size} ids, the model only "
                         f"{cfg.vocab_size}")
    addresser = model.addresser
    if addresser is not None and addresser.compress_ids:
        cmap = dataset.compression_map()
        have = addresser.compression[:cmap.vocab_size].cpu().numpy()
        if not np.array_equal(have, np.asarray(cmap.lookup, dtype=np.int64)):
            raise ValueError(f"{dataset.path}: the model's Engram compression lookup differs from the "
                             "dataset's compression map (trained with another tokenizer?)")


def model_description(path: str | Path) -> str:
    """A short label for a model path: `<run>/step_<N>` for checkpoints, else the folder name."""
    p = Path(path).resolve()
    step = resolve_checkpoint(p) if not (p / "config.json").is_file() else None
    if step is not None:
        run = step.parent.parent.name if step.parent.name == "checkpoints" else step.parent.name
        return f"{run}/{step.name}"
    return p.name


# ----------------------------------------------------------------------------- data and tokens


def validation_batches(dataset: DatasetDir, seq_len: int, batch_size: int, num_batches: int | None,
                       split: str = "valid") -> Iterator[torch.Tensor]:
    """Input ids [batch_size, seq_len] (int64) of consecutive unshuffled packed samples of `split`.

    Yields `num_batches` full batches (None: every full batch of one epoch)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    samples = PackedSamples(dataset.split(split), seq_len, seed=None)
    available = len(samples) // batch_size
    if available == 0:
        raise ValueError(f"{dataset.path} split {split!r}: {len(samples)} samples of {seq_len + 1} tokens "
                         f"cannot fill one batch of {batch_size}; lower --batch-size or --seq-len")
    count = available if num_batches is None else min(num_batches, available)
    for b in range(count):
        rows = [samples[b * batch_size + i][:seq_len] for i in range(batch_size)]
        yield torch.from_numpy(np.stack(rows))


@dataclass(frozen=True)
class TokenSelection:
    """Which positions of each sequence enter the analysis: all (`per_sequence=None`) or a fixed random
    subset of `per_sequence` distinct positions per sequence, drawn from `(seed, batch_index)` only, so every
    model analysed on the same batches sees the same tokens."""

    per_sequence: int | None = None
    seed: int = 0

    def positions(self, batch_index: int, batch_size: int, seq_len: int) -> torch.Tensor | None:
        """[B, k] sorted positions, or None for all positions."""
        k = self.per_sequence
        if k is None or k >= seq_len:
            return None
        if k < 1:
            raise ValueError(f"positions per sequence must be >= 1, got {k}")
        rng = np.random.default_rng([self.seed, batch_index])
        pos = np.stack([np.sort(rng.choice(seq_len, size=k, replace=False)) for _ in range(batch_size)])
        return torch.from_numpy(pos.astype(np.int64))


@torch.no_grad()
def collect_hidden(model: EngramMoEModel, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   include_embedding: bool = False, eod_token_id: int | None = None) -> list[torch.Tensor]:
    """Hidden states [N, D] (fp32) per layer of the selected tokens (N = B*T or B*k, row-major).

    Layers: block outputs 1..L, preceded by the embedding (layer 0) with `include_embedding`.
    input_ids: [B, T]; positions: [B, k] or None (all). `eod_token_id` gives the document segments when the
    model resets n-grams at document boundaries.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    segments = None
    if model.config.engram.reset_at_doc_boundary and model.config.engram.layers:
        if eod_token_id is None:
            raise ValueError("the model resets n-grams at document boundaries: pass eod_token_id")
        from ..memory.reference_hash import segment_ids_from_eod

        segments = segment_ids_from_eod(ids, eod_token_id)
    hidden = model(ids, segment_ids=segments, output_hidden_states=True).hidden_states
    if not include_embedding:
        hidden = hidden[1:]
    out = []
    for h in hidden:  # [B, T, D]
        if positions is not None:
            pos = positions.to(device)
            h = torch.gather(h, 1, pos[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, k, D]
        out.append(h.reshape(-1, h.shape[-1]).float())
    return out


def layer_ids(model: EngramMoEModel, include_embedding: bool = False) -> list[int]:
    """Layer indices of `collect_hidden`'s outputs: 0 is the embedding, l the output of block l."""
    return list(range(0 if include_embedding else 1, model.config.num_layers + 1))
