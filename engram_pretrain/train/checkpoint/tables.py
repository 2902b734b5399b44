"""Engram tables in checkpoints: row-range files that reload under any world size and table layout.

Each table is stored as one or more files `tables/table_<layer>_rows_<start>_<end>.pt`, each holding the
global rows [start, end) of that layer's table:

    layer, num_rows, dim, row_start, row_end    ints
    weight                                      [end - start, dim]  the rows
    exp_avg, exp_avg_sq                         [end - start, dim]  RowSparseAdam moments of those rows
    row_step                                    [end - start] int32 per-row Adam step counts
    step                                        int64 scalar: the table-level step count of the writer

Replicated tables are written once, by rank 0, as the single range [0, num_rows); sharded tables by every
rank that owns rows, one file per shard. Loading is layout-independent: every rank reads the slices of
the files overlapping the rows it now holds (memory-mapped, so a file is never read whole unless needed),
after checking that the files of each layer tile [0, num_rows) exactly. So a checkpoint written by 2
sharded ranks resumes on 4 sharded ranks, on 1 process, or with replicated tables, and vice versa.

The table-level `step` only matters for `bias_correction="global"` (the trainer uses per-row bias
correction); a shard counts the steps in which its own rows were touched, and a reload takes the largest
count among the files of the layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ...memory.table_store import TableStore

TABLES_DIR = "tables"
_NAME = re.compile(r"^table_(\d+)_rows_(\d+)_(\d+)\.pt$")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "row_step")


def shard_file_name(layer: int, start: int, end: int) -> str:
    return f"table_{layer}_rows_{start}_{end}.pt"


def save_table_shards(store: TableStore, optimizer: Any | None, directory: str | Path,
                      rank: int) -> list[Path]:
    """Write this rank's rows of every table (and their optimizer state) into `directory`; returns the files.

    Every rank calls it (replicated: only rank 0 writes); `directory` must exist."""
    directory = Path(directory)
    written = []
    for layer in store.layers():
        if not store.writes_rows(layer, rank):
            continue
        start, end = store.row_range(layer)
        view = store.table(layer)
        weight = store.weight(layer)
        payload: dict[str, Any] = {"layer": layer, "num_rows": view.num_rows, "dim": view.dim,
                                   "row_start": start, "row_end": end, "weight": weight.detach().cpu()}
        if optimizer is not None:
            state = optimizer._state_of(weight)  # zeros before the first step
            payload.update({k: state[k].detach().cpu() for k in STATE_KEYS})
            payload["step"] = state["step"].detach().cpu()
        path = directory / shard_file_name(layer, start, end)
        torch.save(payload, path)
        written.append(path)
    return written


def index_shard_files(directory: str | Path) -> dict[int, list[tuple[int, int, Path]]]:
    """{layer: [(start, end, path), ...] sorted by start} of the shard files in `directory`."""
    found: dict[int, list[tuple[int, int, Path]]] = {}
    for path in Path(directory).iterdir():
        m = _NAME.match(path.name)
        if m:
            layer, start, end = (int(g) for g in m.groups())
            found.setdefault(layer, []).append((start, end, path))
    return {layer: sorted(files) for layer, files in sorted(found.items())}


def _check_tiling(directory: Path, layer: int, files: list[tuple[int, int, Path]], num_rows: int) -> None:
    at = 0
    for start, end, path in files:
        if start != at or end < start:
            raise ValueError(f"{directory}: the row ranges of layer {layer}'s table files do not tile "
                             f"[0, {num_rows}): {path.name} starts at {start}, expected {at} (a rank's file "
                             "is missing or files of two checkpoints were mixed)")
        at = end
    if at != num_rows:
        raise ValueError(f"{directory}: layer {layer}'s table files cover rows [0, {at}), the model's table "
                         f"has {num_rows} rows (missing shard files or a different table size)")


def load_table_shards(store: TableStore, optimizer: Any | None, directory: str | Path) -> None:
    """Fill this rank's rows of every table (and their optimizer state) from the shard files in `directory`,
    whatever world size and layout wrote them. Local reads only (no collective)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no table directory (a checkpoint without Engram tables?)")
    found = index_shard_files(directory)
    if sorted(found) != store.layers():
        raise ValueError(f"{directory} holds tables of layers {sorted(found)}, the model has "
                         f"{store.layers()}")
    for layer in store.layers():
        view = store.table(layer)
        files = found[layer]
        _check_tiling(directory, layer, files, view.num_rows)
        lo, hi = store.row_range(layer)
        weight = store.weight(layer)
        state = optimizer._state_of(weight) if optimizer is not None else None
        step = 0
        for start, end, path in files:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if data["dim"] != view.dim or data["num_rows"] != view.num_rows:
                raise ValueError(f"{path}: a table of {data['num_rows']} x {data['dim']}, the model's is "
                                 f"{view.num_rows} x {view.dim}")
            if state is not None:
                if "step" not in data:
                    raise ValueError(f"{path} holds no optimizer state (written without a table optimizer)")
                step = max(step, int(data["step"]))
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            with torch.no_grad():
                weight[a - lo:b - lo].copy_(data["weight"][a - start:b - start])
                if state is not None:
                    for key in STATE_KEYS:
                        state[key][a - lo:b - lo].copy_(data[key][a - start:b - start])
        if state is not None:
            state["step"].fill_(step)


def read_full_tables(directory: str | Path) -> dict[int, torch.Tensor]:
    """{layer: whole table [num_rows, dim]} assembled from the shard files in `directory` (CPU; for export
    and analysis, which need the whole tables)."""
    directory = Path(directory)
    out = {}
    for layer, files in index_shard_files(directory).items():
        parts = [torch.load(path, map_location="cpu", mmap=True, weights_only=True) for _, _, path in files]
        _check_tiling(directory, layer, files, int(parts[-1]["num_rows"]))
        out[layer] = torch.cat([p["weight"] for p in parts]).clone()
    return out
