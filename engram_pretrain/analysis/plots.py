"""Figures of the analyses (matplotlib, Agg). Every function also writes the plotted data next to the PNG:
`<stem>.csv` (a table) and `<stem>.json` (the same numbers with their labels)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x: float) -> float | None:
    """JSON-safe float (NaN -> null)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def plot_cka(similarity: np.ndarray, layers_a: Sequence[int], layers_b: Sequence[int], out_png: str | Path,
             label_a: str = "MoE", label_b: str = "Engram", alignment: np.ndarray | None = None,
             top: int = 5, title: str | None = None,
             extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Heatmap of the CKA matrix [La, Lb]: model a (MoE) layers on y, model b (Engram) layers on x, colour
    scale [0, 1]; `alignment` (soft-alignment index a_j per column, in layer units of a) is overlaid as a
    curve with the diagonal for reference. Writes the PNG, `.csv` (rows: layers of a; columns: layers of b)
    and `.json` (matrix, layers, alignment, `extra`). Returns {"png", "csv", "json"} paths."""
    s = np.asarray(similarity, dtype=np.float64)
    la, lb = list(layers_a), list(layers_b)
    if s.shape != (len(la), len(lb)):
        raise ValueError(f"similarity {s.shape} does not match {len(la)} x {len(lb)} layers")
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * max(len(lb), 6), 1.0 + 0.4 * max(len(la), 6)))
    img = ax.imshow(s, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                    extent=(-0.5, len(lb) - 0.5, -0.5, len(la) - 0.5))
    fig.colorbar(img, ax=ax, label="linear CKA")
    ax.set_xticks(range(len(lb)), [str(x) for x in lb])
    ax.set_yticks(range(len(la)), [str(x) for x in la])
    ax.set_xlabel(f"{label_b} layer")
    ax.set_ylabel(f"{label_a} layer")
    if alignment is not None:
        # layer index -> row coordinate (rows are evenly spaced layers, so this is linear)
        a = np.asarray(alignment, dtype=np.float64)
        rows = np.interp(a, la, np.arange(len(la)))
        ax.plot(np.arange(len(lb)), rows, "o-", color="red", lw=1.5, ms=4,
                label=f"soft alignment (top-{top})")
        diag = [x for x in lb if la[0] <= x <= la[-1]]
        if diag:
            ax.plot([lb.index(x) for x in diag], np.interp(diag, la, np.arange(len(la))), "--", color="white",
                    lw=1, label="same layer")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"CKA: {label_a} vs {label_b}")
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)

    csv_path, json_path = png.with_suffix(".csv"), png.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{label_a}_layer \\ {label_b}_layer", *lb])
        for i, row in zip(la, s, strict=True):
            w.writerow([i, *(f"{v:.6f}" for v in row)])
        if alignment is not None:
            w.writerow([f"soft_alignment_top{top}", *(f"{v:.4f}" for v in alignment)])
    data = {"label_a": label_a, "label_b": label_b, "layers_a": la, "layers_b": lb,
            "cka": [[_num(v) for v in row] for row in s], "top": top,
            "soft_alignment": None if alignment is None else [_num(v) for v in alignment], **(extra or {})}
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    return {"png": png, "csv": csv_path, "json": json_path}


def plot_layer_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], out_png: str | Path,
                      ylabel: str, title: str | None = None, log_y: bool = False,
                      extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """One curve per label of value vs layer (e.g. LogitLens KL per checkpoint). Writes the PNG, `.csv`
    (one row per layer, one column per label; empty where a label has no such layer) and `.json`."""
    if not curves:
        raise ValueError("no curves to plot")
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (layers, values) in curves.items():
        if len(layers) != len(values):
            raise ValueError(f"curve {label!r}: {len(layers)} layers but {len(values)} values")
        ax.plot(list(layers), list(values), "o-", ms=3, label=label)
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)

    csv_path, json_path = png.with_suffix(".csv"), png.with_suffix(".json")
    all_layers = sorted({int(x) for layers, _ in curves.values() for x in layers})
    lookup = {label: dict(zip((int(x) for x in layers), values, strict=True))
              for label, (layers, values) in curves.items()}
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", *curves])
        for layer in all_layers:
            w.writerow([layer, *(f"{lookup[k][layer]:.6g}" if layer in lookup[k] else "" for k in curves)])
    data = {"ylabel": ylabel, "curves": {label: {"layers": [int(x) for x in layers],
                                                 "values": [_num(v) for v in values]}
                                         for label, (layers, values) in curves.items()}, **(extra or {})}
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    return {"png": png, "csv": csv_path, "json": json_path}


def plot_logit_lens(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                    extra: Mapping[str, Any] | None = None) -> dict[str, dict[str, Path]]:
    """LogitLens figures for several models: `results[label] = {"layers": [...], "kl_forward": [...],
    "kl_reverse": [...]}`. Writes `logit_lens.png` (KL(p_final || p_l)) and `logit_lens_reverse.png`
    (KL(p_l || p_final)) with their data files into `out_dir`."""
    out = Path(out_dir)
    written = {}
    for key, name, ylabel in (("kl_forward", "logit_lens", "KL(p_final || p_layer) [nats/token]"),
                              ("kl_reverse", "logit_lens_reverse", "KL(p_layer || p_final) [nats/token]")):
        curves = {label: (r["layers"], list(r[key])) for label, r in results.items()}
        written[key] = plot_layer_curves(curves, out / f"{name}.png", ylabel, title="LogitLens", extra=extra)
    return written
