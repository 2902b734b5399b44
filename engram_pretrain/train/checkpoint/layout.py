"""Names and discovery of checkpoints: `<ckpt_dir>/step_<N>/` directories, the `complete` marker, the `latest`
pointer, and the files inside a step directory (see the package docstring for the layout)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ...config import RunConfig

logger = logging.getLogger(__name__)

PREFIX = "step_"
TMP_SUFFIX = ".tmp"
COMPLETE = "complete"
LATEST = "latest"
DS_TAG = "ds"
BUFFERS = "buffers.pt"
TRAINER_STATE = "trainer.json"
RNG_DIR = "rng"
CONFIG_FILE = "config.yaml"
FORMAT = 2
"""1: tables.pt + table_optim.pt (replicated only); 2: tables/ row-range files."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or name.endswith(TMP_SUFFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def is_complete(path: Path) -> bool:
    """A finished checkpoint: a `step_<N>` directory (not `.tmp`) holding the `complete` marker."""
    return path.is_dir() and _step_of(path) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if is_complete(p)]
    return sorted((s, p) for s, p in found if s is not None)


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None.

    The `latest` pointer is read first; a checkpoint newer than it can only be one whose rename finished
    but whose pointer update did not (it is complete: the marker is written before the rename), so the
    newest complete directory wins. Incomplete and `*.tmp` directories are never chosen.
    """
    complete = complete_checkpoints(ckpt_dir)
    pointer = Path(ckpt_dir) / LATEST
    named = None
    if pointer.is_file():
        candidate = Path(ckpt_dir) / pointer.read_text().strip()
        named = candidate if is_complete(candidate) else None
        if named is None:
            logger.warning("%s names %s, which is not a complete checkpoint; ignoring it", pointer, candidate)
    if not complete:
        return named
    newest = complete[-1][1]
    return newest if named is None or _step_of(newest) >= (_step_of(named) or 0) else named


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> Path | None:
    """`--resume` semantics: None / "none" start fresh; "auto" takes the latest complete checkpoint if any;
    anything else is a checkpoint path (a `step_<N>` directory, or a checkpoint dir whose latest is taken)."""
    if resume is None or resume.lower() == "none":
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
    raise ValueError(f"--resume {resume}: not a complete checkpoint (a step_<N> directory with a "
                     f"'{COMPLETE}' marker) nor a checkpoint directory containing one")


def resolve_checkpoint(path: str | Path) -> Path | None:
    """The `step_<N>` directory `path` names: itself, the latest in a checkpoint dir, or the latest in a run
    directory's `checkpoints/`. None when `path` is none of these."""
    p = Path(path)
    if is_complete(p):
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            latest = find_latest(root)
            if latest is not None:
                return latest
    return None


def read_trainer_state(step_dir: str | Path) -> dict[str, Any]:
    """`trainer.json` of a checkpoint: format, step, world size, ZeRO stage, data position, counters."""
    return json.loads((Path(step_dir) / TRAINER_STATE).read_text())


def checkpoint_dir(cfg: RunConfig) -> Path:
    """`checkpoint.dir`, defaulting to `<output_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output_dir) / "checkpoints"
