"""lm-evaluation-harness on exports (`engram-pretrain eval`, the offline task set eval_tasks/engram_local):
a briefly trained tiny model beats chance on word order and compresses held-out text better than an
untrained export, which scores at chance and at the uniform distribution's bits per byte; the task files
are what `python -m data_prep.eval_tasks` builds from the corpus."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.eval_tasks import OUT, write_tasks
from engram_pretrain.config import load_config
from engram_pretrain.data.dataset_dir import DatasetDir
from engram_pretrain.export.evaluate import run_eval
from engram_pretrain.export.exporter import export_model
from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.model.transformer import EngramMoEModel

REPO = Path(__file__).resolve().parents[1]
LIMIT = 200  # documents per task: standard error of a 25%-chance accuracy sqrt(.25 * .75 / 200) = 0.031
SE = math.sqrt(0.25 * 0.75 / LIMIT)
TASKS = "kjv_word_order,kjv_heldout_perplexity"


def _run(*args: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default corpus as `make data` builds it, tiny trained for 100 steps on it, both exported, and an
    untrained export of the same config."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    _run("-m", "data_prep", "build", "default", "--out", str(data), "--tokenizer", "bpe",
         "--vocab-size", "4096")
    run = root / "run"
    _run("-m", "engram_pretrain.cli", "train", "configs/tiny.yaml", f"data.paths=[{data}]",
         f"output_dir={run}",
         "train.steps=100", "train.eval_interval=0", "checkpoint.interval=100", "logging.tensorboard=false",
         "--resume", "none")
    _run("-m", "engram_pretrain.cli", "export", str(run), str(root / "trained"))
    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    dataset = DatasetDir(data)
    addressing = build_addressing(cfg, dataset.compression_map())
    torch.manual_seed(0)
    export_model(EngramMoEModel(cfg, addressing), addressing, dataset.tokenizer_dir,
                 dataset.path / "compression_map.npz", root / "untrained")
    return {"trained": root / "trained", "untrained": root / "untrained", "root": root}


def test_task_files_are_built_from_the_heldout_split(tmp_path: Path, exports: dict[str, Path]) -> None:
    from tokenizers import Tokenizer

    counts = write_tasks(tmp_path)
    for name, count in counts.items():
        fresh = (tmp_path / name).read_bytes()
        assert fresh == (OUT / name).read_bytes(), f"{name}: rerun python -m data_prep.eval_tasks"
        assert count > 0
    tok = Tokenizer.from_file(str(exports["trained"] / "tokenizer.json"))
    rows = [json.loads(line) for line in (tmp_path / "word_order.jsonl").read_text().splitlines()]
    for row in rows:  # the same tokens in every option: only their order tells the real verse
        ids = [sorted(tok.encode(row["context"] + c).ids) for c in row["choices"]]
        assert all(i == ids[0] for i in ids), row
        assert len(set(row["choices"])) == 4
    labels = [r["label"] for r in rows]
    assert all(abs(labels.count(k) / len(labels) - 0.25) < 0.06 for k in range(4))


def test_trained_export_beats_chance_and_untrained_is_at_chance(exports: dict[str, Path]) -> None:
    got = {name: run_eval(exports[name], TASKS, exports["root"] / f"eval-{name}", limit=LIMIT, quiet=True)
           for name in ("trained", "untrained")}
    trained, untrained = got["trained"], got["untrained"]
    assert trained["kjv_word_order"]["acc"] > 0.25 + 5 * SE, trained
    assert abs(untrained["kjv_word_order"]["acc"] - 0.25) < 4 * SE, untrained
    bpb_trained = trained["kjv_heldout_perplexity"]["bits_per_byte"]
    bpb_untrained = untrained["kjv_heldout_perplexity"]["bits_per_byte"]
    assert bpb_trained < bpb_untrained - 0.5, (bpb_trained, bpb_untrained)
    # an untrained model (init std 0.02) is close to uniform: log2(V) bits per token
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(exports["untrained"] / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in (OUT / "heldout.jsonl").read_text().splitlines()]
    tokens = sum(len(tok.encode(t).ids) for t in texts)
    uniform = tokens * math.log2(tok.get_vocab_size()) / sum(len(t.encode()) for t in texts)
    assert bpb_untrained == pytest.approx(uniform, rel=0.03)
