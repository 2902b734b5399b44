"""`engram-pretrain eval <export>`: lm-evaluation-harness on an exported folder (`make eval`, docs/export.md).

Runs `lm_eval --model hf --model_args pretrained=<export>,trust_remote_code=True,logits_cache=False` with
the repository's task folder `eval_tasks/` on the include path, after `check_export_folder`, offline by
default. `logits_cache=False`: the harness shares one forward between requests whose tokens agree up to
the last one and then reads the shorter continuation's log-probs from the wrong positions when two tasks
split the same text differently into context and continuation (seen with kjv_word_order and
kjv_verse_completion in one run); without the cache every request gets its own forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import REPO_ROOT

TASK_DIR = REPO_ROOT / "eval_tasks"
LOCAL_TASKS = "engram_local"


def lm_eval_command(export: str | os.PathLike, tasks: str, output: str | os.PathLike, batch_size: int = 16,
                    limit: int | None = None, extra: list[str] | None = None) -> list[str]:
    """The `lm_eval` command line (the harness's CLI, run by this interpreter)."""
    model_args = f"pretrained={export},trust_remote_code=True,logits_cache=False"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
           "--include_path", str(TASK_DIR), "--tasks", tasks, "--batch_size", str(batch_size),
           "--output_path", str(output)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd + list(extra or [])


def read_results(output: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} of the newest results_*.json under `output` (filter suffixes dropped)."""
    files = sorted(Path(output).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise ValueError(f"{output}: no lm-eval results_*.json")
    results = json.loads(files[-1].read_text())["results"]
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k}
            for task, metrics in results.items()}


def run_eval(export: str | os.PathLike, tasks: str = LOCAL_TASKS, output: str | os.PathLike | None = None,
             batch_size: int = 16, limit: int | None = None, offline: bool = True,
             extra: list[str] | None = None, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """Check the folder, run the harness (from the repository root: the local tasks' data paths are
    relative to it), return `read_results`. `quiet` keeps the harness's output (shown on failure)."""
    from .modeling_engram_moe import check_export_folder

    export = Path(export).resolve()
    check_export_folder(export)
    output = Path(output).resolve() if output is not None else export / "eval"
    env = dict(os.environ)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(lm_eval_command(export, tasks, output, batch_size, limit, extra), cwd=REPO_ROOT,
                          env=env, stdin=subprocess.DEVNULL, capture_output=quiet, text=True)
    if done.returncode != 0:
        tail = (done.stdout or "")[-2000:] + (done.stderr or "")[-2000:] if quiet else ""
        raise RuntimeError(f"lm_eval exited with {done.returncode}\n{tail}")
    return read_results(output)


def cmd_eval(args: argparse.Namespace) -> int:
    results = run_eval(args.export, args.tasks, args.output, args.batch_size, args.limit, not args.online)
    print(json.dumps(results, indent=1, sort_keys=True))
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="lm-evaluation-harness on an exported folder (default: the offline "
                                    f"task set {LOCAL_TASKS})")
    p.add_argument("export", help="folder written by `engram-pretrain export`")
    p.add_argument("--tasks", default=LOCAL_TASKS, help=f"comma-separated lm-eval tasks or groups (default "
                                                        f"{LOCAL_TASKS}: eval_tasks/{LOCAL_TASKS}/)")
    p.add_argument("--output", default=None, help="results folder (default: <export>/eval)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--online", action="store_true", help="let the harness reach the hub (standard tasks)")
    p.set_defaults(func=cmd_eval)
