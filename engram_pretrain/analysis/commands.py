"""`engram-pretrain analyze cka` and `engram-pretrain analyze logit-lens`: argparse wiring and the analyses.

    engram-pretrain analyze cka runs/moe runs/engram --data data/out/default --out runs/analysis/cka
    engram-pretrain analyze logit-lens runs/moe runs/engram --data data/out/default --out runs/analysis/ll

A model is an exported Hugging Face folder, a checkpoint `step_<N>/`, a checkpoint directory or a run
directory (its latest complete checkpoint). Tokens come from the unshuffled validation split of --data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_SEQ_LEN_CAP = 512


@dataclass
class TokenSettings:
    """Which tokens the analyses read (identical for every model)."""

    batches: int | None = 16
    batch_size: int = 8
    seq_len: int | None = None
    """None: min(512, the models' max_seq_len)."""
    positions: int | None = None
    """Random positions per sequence (None: all)."""
    seed: int = 0
    split: str = "valid"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seq_len(models: Sequence[Any], requested: int | None) -> int:
    limit = min(m.config.max_seq_len for m in models)
    if requested is None:
        return min(DEFAULT_SEQ_LEN_CAP, limit)
    if requested > limit:
        raise ValueError(f"sequence length {requested} exceeds a model's max_seq_len {limit}; pass a smaller "
                         "--seq-len")
    return requested


def _unique_labels(paths: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    from .hidden import model_description

    if labels:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} models")
        return list(labels)
    out: list[str] = []
    for p in paths:
        name = model_description(p)
        out.append(name if name not in out else f"{name} ({len(out)})")
    return out


class _NormStats:
    """Per-layer token-norm statistics (CKA is sensitive to outlier tokens, Davari et al. 2023)."""

    def __init__(self, num_layers: int) -> None:
        self.total = np.zeros(num_layers)
        self.max = np.zeros(num_layers)
        self.count = 0

    def update(self, feats: Sequence[torch.Tensor]) -> None:
        norms = torch.stack([f.double().norm(dim=-1) for f in feats])  # [L, N]
        self.total += norms.sum(1).cpu().numpy()
        self.max = np.maximum(self.max, norms.max(1).values.cpu().numpy())
        self.count += norms.shape[1]

    def summary(self) -> dict[str, list[float]]:
        mean = self.total / max(self.count, 1)
        return {"mean_token_norm": mean.tolist(), "max_over_mean_token_norm": (self.max / mean).tolist()}


def cka_analysis(path_a: str | Path, path_b: str | Path, data: str | Path, out_dir: str | Path,
                 tokens: TokenSettings | None = None, minibatch: int = 256, top: int = 5,
                 include_embedding: bool = False, device: str = "auto", label_a: str | None = None,
                 label_b: str | None = None) -> dict[str, Any]:
    """CKA matrix between every layer of model a (y-axis) and model b (x-axis) with the top-k soft alignment;
    writes `cka.png`, `cka.csv`, `cka.json` into `out_dir` and returns the JSON data."""
    from ..data.dataset_dir import DatasetDir
    from .cka import MinibatchCKA, soft_alignment
    from .hidden import TokenSelection, collect_hidden, layer_ids, load_model, validation_batches
    from .plots import plot_cka

    tokens = tokens or TokenSettings()
    dataset = DatasetDir(data)
    dev = _device(device)
    default_a, default_b = _unique_labels([path_a, path_b], None)
    label_a, label_b = label_a or default_a, label_b or default_b
    model_a = load_model(path_a, dataset).to(dev)
    model_b = load_model(path_b, dataset).to(dev)
    seq_len = _seq_len([model_a, model_b], tokens.seq_len)
    layers_a, layers_b = layer_ids(model_a, include_embedding), layer_ids(model_b, include_embedding)
    cka = MinibatchCKA(len(layers_a), len(layers_b), minibatch)
    norms_a, norms_b = _NormStats(len(layers_a)), _NormStats(len(layers_b))
    select = TokenSelection(tokens.positions, tokens.seed)
    seen = 0
    for b, ids in enumerate(validation_batches(dataset, seq_len, tokens.batch_size, tokens.batches,
                                               tokens.split)):
        pos = select.positions(b, *ids.shape)
        ha = collect_hidden(model_a, ids, pos, include_embedding, dataset.eod_token_id)
        hb = collect_hidden(model_b, ids, pos, include_embedding, dataset.eod_token_id)
        norms_a.update(ha)
        norms_b.update(hb)
        cka.add(ha, hb)
        seen += ha[0].shape[0]
    if cka.num_minibatches == 0:
        raise ValueError(f"{seen} tokens do not fill one CKA minibatch of {minibatch}: use more --batches, "
                         "a larger --batch-size / --seq-len, or a smaller --minibatch")
    s = cka.result()
    align = soft_alignment(s, top, row_layers=layers_a)
    extra = {"model_a": str(path_a), "model_b": str(path_b), "data": str(data), "split": tokens.split,
             "seq_len": seq_len, "batch_size": tokens.batch_size, "positions_per_sequence": tokens.positions,
             "seed": tokens.seed, "minibatch": minibatch, "num_minibatches": cka.num_minibatches,
             "tokens_used": cka.num_minibatches * minibatch, "tokens_dropped": cka.pending,
             "estimator": "linear CKA, unbiased HSIC (U-centred), summed over fixed-size minibatches",
             "stream_collapse": "learned head collapse", "norms_a": norms_a.summary(),
             "norms_b": norms_b.summary()}
    written = plot_cka(s, layers_a, layers_b, Path(out_dir) / "cka.png", label_a, label_b, align, top,
                       extra=extra)
    return json.loads(written["json"].read_text())


def logit_lens_analysis(paths: Sequence[str | Path], data: str | Path, out_dir: str | Path,
                        tokens: TokenSettings | None = None, include_embedding: bool = False,
                        device: str = "auto", labels: Sequence[str] | None = None,
                        chunk_tokens: int = 1024) -> dict[str, Any]:
    """Per-layer KL to the final distribution for each model (both directions); writes `logit_lens.png`,
    `logit_lens_reverse.png` and their data into `out_dir`; returns {label: {layers, kl_forward, kl_reverse,
    tokens}}."""
    from ..data.dataset_dir import DatasetDir
    from .hidden import TokenSelection, collect_hidden, layer_ids, load_model, validation_batches
    from .logit_lens import LogitLens
    from .plots import plot_logit_lens

    if not paths:
        raise ValueError("logit-lens needs at least one model")
    tokens = tokens or TokenSettings()
    dataset = DatasetDir(data)
    dev = _device(device)
    names = _unique_labels(paths, labels)
    select = TokenSelection(tokens.positions, tokens.seed)
    results: dict[str, Any] = {}
    seq_len = tokens.seq_len
    for path, name in zip(paths, names, strict=True):
        model = load_model(path, dataset).to(dev)
        seq_len = _seq_len([model], seq_len)  # fixed by the first model: every model reads the same tokens
        layers = layer_ids(model, include_embedding)
        lens = LogitLens.from_model(model, len(layers), chunk_tokens)
        for b, ids in enumerate(validation_batches(dataset, seq_len, tokens.batch_size, tokens.batches,
                                                   tokens.split)):
            lens.update(collect_hidden(model, ids, select.positions(b, *ids.shape), include_embedding,
                                       dataset.eod_token_id))
        r = lens.result()
        results[name] = {"path": str(path), "layers": layers, "kl_forward": r["kl_forward"].tolist(),
                         "kl_reverse": r["kl_reverse"].tolist(), "tokens": lens.num_tokens}
        del model, lens
    extra = {"data": str(data), "split": tokens.split, "seq_len": seq_len, "batch_size": tokens.batch_size,
             "positions_per_sequence": tokens.positions, "seed": tokens.seed,
             "stream_collapse": "learned head collapse", "models": results}
    plot_logit_lens(results, out_dir, extra=extra)
    return results


# ----------------------------------------------------------------------------- CLI


def _token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (python -m data_prep build)")
    p.add_argument("--split", default="valid", help="dataset split (default: valid)")
    p.add_argument("--batches", type=int, default=16, help="batches of --batch-size sequences (default: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence (default: min({DEFAULT_SEQ_LEN_CAP}, models' max_seq_len))")
    p.add_argument("--positions", type=int, default=None,
                   help="random positions per sequence (same for every model; default: all positions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the position choice")
    p.add_argument("--include-embedding", action="store_true", help="add the embedding output as layer 0")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _settings(args: argparse.Namespace) -> TokenSettings:
    return TokenSettings(batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
                         positions=args.positions, seed=args.seed, split=args.split)


def cmd_cka(args: argparse.Namespace) -> int:
    try:
        res = cka_analysis(args.model_a, args.model_b, args.data, args.out, _settings(args), args.minibatch,
                           args.top, args.include_embedding, args.device, args.label_a, args.label_b)
    except ValueError as err:
        print(f"analyze cka: {err}", file=sys.stderr)
        return 2
    diag = [res["cka"][i][j] for i, la in enumerate(res["layers_a"]) for j, lb in enumerate(res["layers_b"])
            if la == lb]
    print(f"CKA {res['label_a']} (y) vs {res['label_b']} (x): {res['num_minibatches']} minibatches of "
          f"{res['minibatch']} tokens ({res['tokens_dropped']} dropped)")
    if diag:
        print("  same-layer CKA: " + " ".join(f"{v:.3f}" for v in diag))
    print(f"  soft alignment (top-{res['top']}): "
          + " ".join("nan" if v is None else f"{v:.2f}" for v in res["soft_alignment"]))
    print(f"  wrote {Path(args.out) / 'cka.png'} (+ .csv, .json)")
    return 0


def cmd_logit_lens(args: argparse.Namespace) -> int:
    try:
        res = logit_lens_analysis(args.models, args.data, args.out, _settings(args), args.include_embedding,
                                  args.device, args.labels, args.chunk_tokens)
    except ValueError as err:
        print(f"analyze logit-lens: {err}", file=sys.stderr)
        return 2
    for name, r in res.items():
        print(f"{name} ({r['tokens']} tokens) KL(p_final || p_layer): "
              + " ".join(f"L{layer}={v:.3f}" for layer, v in zip(r["layers"], r["kl_forward"], strict=True)))
    print(f"  wrote {Path(args.out) / 'logit_lens.png'}, logit_lens_reverse.png (+ .csv, .json)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `analyze cka` and `analyze logit-lens` to the `engram-pretrain` subcommands."""
    p = sub.add_parser("analyze", help="representation analyses of trained models (CKA, LogitLens)")
    asub = p.add_subparsers(dest="analysis", required=True)

    c = asub.add_parser("cka", help="linear CKA (unbiased minibatch HSIC) between every layer pair of two "
                                    "models, heatmap with the soft-alignment curve")
    c.add_argument("model_a", help="model on the y-axis (e.g. the MoE baseline): HF folder, checkpoint "
                                   "step dir, checkpoint dir or run dir")
    c.add_argument("model_b", help="model on the x-axis (e.g. the Engram model)")
    _token_args(c)
    c.add_argument("--minibatch", type=int, default=256, help="tokens per HSIC minibatch (default: 256)")
    c.add_argument("--top", type=int, default=5, help="top-k rows of the soft alignment index (default: 5)")
    c.add_argument("--label-a", default=None, help="axis label of model a (default: from its path)")
    c.add_argument("--label-b", default=None, help="axis label of model b")
    c.add_argument("--out", default="runs/analysis/cka", help="output directory (default: runs/analysis/cka)")
    c.set_defaults(func=cmd_cka)

    g = asub.add_parser("logit-lens", help="per-layer KL between each layer's LM-head distribution and the "
                                           "final one, for several models")
    g.add_argument("models", nargs="+",
                   help="models (HF folders, checkpoint step dirs, checkpoint or run dirs)")
    _token_args(g)
    g.add_argument("--labels", nargs="+", default=None, help="one legend label per model")
    g.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per [chunk, vocab] logit block")
    g.add_argument("--out", default="runs/analysis/logit_lens",
                   help="output directory (default: runs/analysis/logit_lens)")
    g.set_defaults(func=cmd_logit_lens)
