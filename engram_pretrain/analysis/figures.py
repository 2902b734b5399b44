"""The paper's experiment figures from a results table (`engram-pretrain experiment ... results.json`).

    plot_layer_sweep(rows, "runs/ablation/proxy/figure5.png")     # Figure 5
    plot_allocation(rows, "runs/allocation/proxy/figure3.png")    # Figure 3

`rows` are the `runs` of `results.json`: dicts with at least `run`, `label`, `kind`, `val_loss` (None when
the run has not finished), plus `layer` (sweep runs, 0-based block index) and `engram_share` /
`target_share` (allocation runs). Each function writes the PNG and the plotted numbers next to it
(`<stem>.csv`, `<stem>.json`) and returns their paths. Runs without a validation loss are listed in the
data with `null` and not drawn.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ABLATION_MARKERS = ("s", "^", "v", "D", "P", "X", "*", "h", "<", ">")
X_AXIS_NOTE = "Layer Index (1-based as in the paper: block index + 1)"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss(row: Mapping[str, Any]) -> float | None:
    v = row.get("val_loss")
    if v is None or v == "":
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def seed_noise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean and sample std of the reference's final validation loss over its seeds (reference + `seed`
    runs with a loss); None with fewer than two."""
    losses = [(r["run"], v) for r in rows
              if r.get("kind") in ("reference", "seed") and (v := _loss(r)) is not None]
    if len(losses) < 2:
        return None
    values = [v for _, v in losses]
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values),
            "min": min(values), "max": max(values), "runs": [n for n, _ in losses]}


def _write_data(png: Path, columns: list[str], points: list[dict[str, Any]],
                meta: dict[str, Any]) -> dict[str, Path]:
    csv_path, json_path = png.with_suffix(".csv"), png.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for p in points:
            writer.writerow({k: "" if p.get(k) is None else p[k] for k in columns})
    json_path.write_text(json.dumps({**meta, "points": points}, indent=1))
    return {"png": png, "csv": csv_path, "json": json_path}


def plot_layer_sweep(rows: Sequence[Mapping[str, Any]], out_png: str | Path, title: str | None = None,
                     num_layers: int | None = None) -> dict[str, Path]:
    """Figure 5: validation loss of one full-budget Engram at each layer (curve over the 1-based Layer
    Index), dashed lines for the MoE baseline and the reference (with the seed spread as a band when the
    reference was repeated), and one marker per component ablation to the right of the sweep."""
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    sweep = sorted((r for r in rows if r.get("kind") == "sweep"), key=lambda r: int(r["layer"]))
    ablations = [r for r in rows if r.get("kind") == "ablation"]
    lines = {kind: next((r for r in rows if r.get("kind") == kind), None)
             for kind in ("baseline", "reference")}
    if num_layers is None:
        num_layers = max((int(r["layer"]) + 1 for r in sweep), default=0)
    points: list[dict[str, Any]] = []
    for r in sweep:
        points.append({"series": "sweep", "run": r["run"], "label": r.get("label"),
                       "x": int(r["layer"]) + 1, "layer": int(r["layer"]), "val_loss": _loss(r)})
    ablation_x0 = num_layers + 1.5 if num_layers else 1
    for j, r in enumerate(ablations):
        points.append({"series": "ablation", "run": r["run"], "label": r.get("label"), "x": ablation_x0 + j,
                       "layer": None, "val_loss": _loss(r)})
    for kind, r in lines.items():
        if r is not None:
            points.append({"series": kind, "run": r["run"], "label": r.get("label"), "x": None, "layer": None,
                           "val_loss": _loss(r)})
    noise = seed_noise(rows)

    plt = _pyplot()
    width = 5.5 + 0.45 * (num_layers + len(ablations))
    fig, ax = plt.subplots(figsize=(max(9.0, width), 4.8))
    xs = [p["x"] for p in points if p["series"] == "sweep" and p["val_loss"] is not None]
    ys = [p["val_loss"] for p in points if p["series"] == "sweep" and p["val_loss"] is not None]
    if xs:
        ax.plot(xs, ys, "o-", color="tab:blue", lw=1.8, ms=5,
                label="single Engram, full budget (layer sweep)")
    styles = {"baseline": ("tab:gray", "MoE baseline"), "reference": ("tab:red", "Engram reference")}
    for kind, r in lines.items():
        v = _loss(r) if r is not None else None
        if v is not None:
            color, name = styles[kind]
            label = r.get("label") or name
            ax.axhline(v, ls="--", color=color, lw=1.4, label=f"{label}: {v:.4f}")
    if noise is not None:
        ax.axhspan(noise["mean"] - noise["std"], noise["mean"] + noise["std"], color="tab:red", alpha=0.12,
                   label=f"reference seeds: ±1 std = {noise['std']:.4f} (n={noise['n']})")
    for j, p in enumerate(q for q in points if q["series"] == "ablation"):
        if p["val_loss"] is not None:
            ax.plot([p["x"]], [p["val_loss"]], ABLATION_MARKERS[j % len(ABLATION_MARKERS)], ms=8,
                    label=f"{p['label']}: {p['val_loss']:.4f}")
    ticks = list(range(1, num_layers + 1)) + [ablation_x0 + j for j in range(len(ablations))]
    labels = [str(t) for t in range(1, num_layers + 1)] + [str(r.get("label")) for r in ablations]
    ax.set_xticks(ticks, labels)
    for tick in ax.get_xticklabels()[num_layers:]:
        tick.set_rotation(35)
        tick.set_ha("right")
    if num_layers and ablations:
        ax.axvline(num_layers + 0.75, color="black", lw=0.6, ls=":")
    ax.set_xlabel(X_AXIS_NOTE)
    if num_layers and ablations:
        ax.text(num_layers + 1.0, 0.97, "component ablations", transform=ax.get_xaxis_transform(), fontsize=8,
                va="top", color="dimgray")
    ax.set_ylabel("Validation loss")
    ax.set_title(title or "Engram ablations: layer sweep and components")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)
    meta = {"figure": "layer sweep and ablations (paper Figure 5)", "x_axis": X_AXIS_NOTE,
            "num_layers": num_layers, "seed_noise": noise}
    return _write_data(png, ["series", "run", "label", "x", "layer", "val_loss"], points, meta)


def plot_allocation(rows: Sequence[Mapping[str, Any]], out_png: str | Path,
                    title: str | None = None) -> dict[str, Path]:
    """Figure 3: validation loss against the actual share of sparse parameters held by Engram (percent),
    at fixed total parameters; the 0% point (the MoE baseline) is also drawn as a dashed line."""
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    runs = [r for r in rows if r.get("kind") == "allocation"]
    points = sorted(({"run": r["run"], "label": r.get("label"),
                      "target_share_pct": 100 * float(r.get("target_share") or 0.0),
                      "engram_share_pct": 100 * float(r.get("engram_share") or 0.0),
                      "removed_experts": r.get("removed_experts"), "routed_experts": r.get("routed_experts"),
                      "total_params": r.get("total_params"), "activated_params": r.get("activated_params"),
                      "val_loss": _loss(r)} for r in runs), key=lambda p: p["engram_share_pct"])
    done = [p for p in points if p["val_loss"] is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if done:
        ax.plot([p["engram_share_pct"] for p in done], [p["val_loss"] for p in done], "o-", color="tab:blue",
                lw=1.8, ms=6, label="fixed total and activated parameters")
        for p in done:
            if p["routed_experts"] not in (None, ""):
                ax.annotate(f"{p['routed_experts']} exp.", (p["engram_share_pct"], p["val_loss"]),
                            textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        zero = next((p for p in done if p["removed_experts"] in (0, "0")), None)
        if zero is not None:
            ax.axhline(zero["val_loss"], ls="--", color="tab:gray", lw=1.2,
                       label=f"MoE baseline (0%): {zero['val_loss']:.4f}")
    ax.set_xlabel("Engram share of sparse parameters (%)")
    ax.set_ylabel("Validation loss")
    ax.set_title(title or "Sparsity allocation between MoE experts and Engram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)
    columns = ["run", "label", "target_share_pct", "engram_share_pct", "removed_experts", "routed_experts",
               "total_params", "activated_params", "val_loss"]
    return _write_data(png, columns, points,
                       {"figure": "sparsity allocation (paper Figure 3)", "x_axis": "engram_share_pct"})
