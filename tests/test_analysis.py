"""CKA (unbiased minibatch HSIC), soft alignment, LogitLens, plots and the `analyze` CLI.

References are written here: Song's HSIC₁ with explicit loops, soft alignment by sorting, KL in fp64.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_pretrain.analysis.cka import MinibatchCKA, cka_unbiased, hsic_unbiased, soft_alignment, u_centre
from engram_pretrain.analysis.hidden import (
    TokenSelection,
    collect_hidden,
    layer_ids,
    load_model,
    resolve_checkpoint,
    validation_batches,
)
from engram_pretrain.analysis.logit_lens import LogitLens
from engram_pretrain.analysis.plots import plot_cka, plot_layer_curves
from engram_pretrain.data.dataset_dir import DatasetDir
from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.model.config import ModelConfig
from engram_pretrain.model.transformer import EngramMoEModel
from engram_pretrain.testing.datasets import make_dataset_dir

# ----------------------------------------------------------------------------- references


def song_hsic_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC₁ of linear kernels, with explicit loops (fp64)."""
    n = x.shape[0]
    k = [[float(np.dot(x[i], x[j])) if i != j else 0.0 for j in range(n)] for i in range(n)]
    l = [[float(np.dot(y[i], y[j])) if i != j else 0.0 for j in range(n)] for i in range(n)]  # noqa: E741
    trace = sum(k[i][j] * l[j][i] for i in range(n) for j in range(n))
    sum_k = sum(sum(row) for row in k)
    sum_l = sum(sum(row) for row in l)
    k_rows = [sum(k[i]) for i in range(n)]  # (K̃ 1)_i; K̃ is symmetric
    l_cols = [sum(l[i]) for i in range(n)]  # (L̃ 1)_i
    cross = sum(k_rows[i] * l_cols[i] for i in range(n))  # 1ᵀ K̃ L̃ 1
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def song_cka_loops(x: np.ndarray, y: np.ndarray) -> float:
    return song_hsic_loops(x, y) / math.sqrt(song_hsic_loops(x, x) * song_hsic_loops(y, y))


# ----------------------------------------------------------------------------- CKA estimator


def test_u_centring_equals_song_formula() -> None:
    rng = np.random.default_rng(0)
    n = 12
    x = rng.normal(size=(n, 5))
    y = x @ rng.normal(size=(5, 3)) + 0.5 * rng.normal(size=(n, 3))
    ref = song_hsic_loops(x, y)
    kx, ky = torch.from_numpy(x @ x.T), torch.from_numpy(y @ y.T)
    via_u = float((u_centre(kx) * u_centre(ky)).sum()) / (n * (n - 3))
    assert via_u == pytest.approx(ref, rel=1e-10)
    assert hsic_unbiased(kx, ky) == pytest.approx(ref, rel=1e-10)
    assert cka_unbiased(x, y) == pytest.approx(song_cka_loops(x, y), rel=1e-10)
    with pytest.raises(ValueError, match="at least 4"):
        u_centre(torch.eye(3))


def test_cka_invariances_and_independence() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 10))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    assert cka_unbiased(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert cka_unbiased(x, 3.7 * x) == pytest.approx(1.0, abs=1e-10)
    # minibatch estimator: invariances hold per layer pair
    mb = MinibatchCKA(1, 3, minibatch_size=16)
    t = torch.from_numpy(x)
    mb.add([t], [t @ torch.from_numpy(q), 0.01 * t, torch.from_numpy(rng.normal(size=(64, 10)))])
    s = mb.result()
    assert s[0, 0] == pytest.approx(1.0, abs=1e-10) and s[0, 1] == pytest.approx(1.0, abs=1e-10)
    assert abs(s[0, 2]) < 0.2  # independent features: unbiased CKA near 0
    # a different-but-related representation is strictly between
    y = x[:, :5] @ rng.normal(size=(5, 4))
    assert 0.2 < cka_unbiased(x, y) < 0.9


def test_single_minibatch_equals_direct_formula() -> None:
    rng = np.random.default_rng(2)
    n = 20
    feats_a = [rng.normal(size=(n, 6)) for _ in range(3)]
    feats_b = [feats_a[0] @ rng.normal(size=(6, 4)), rng.normal(size=(n, 7))]
    mb = MinibatchCKA(3, 2, minibatch_size=n)
    mb.update([torch.from_numpy(f) for f in feats_a], [torch.from_numpy(f) for f in feats_b])
    s = mb.result()
    assert s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert s[i, j] == pytest.approx(song_cka_loops(feats_a[i], feats_b[j]), rel=1e-9, abs=1e-12)


def test_minibatch_buffering_and_agreement_with_full_batch() -> None:
    rng = np.random.default_rng(3)
    total, n = 2048 + 37, 256
    x = rng.normal(size=(total, 8)) * np.linspace(0.5, 3.0, 8)  # anisotropic
    y = np.tanh(x @ rng.normal(size=(8, 6))) + 0.3 * rng.normal(size=(total, 6))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mb = MinibatchCKA(1, 1, minibatch_size=n)
    done = 0
    for start, stop in ((0, 300), (300, 311), (311, 1200), (1200, total)):  # irregular chunks
        done += mb.add([xt[start:stop]], [yt[start:stop]])
    assert done == mb.num_minibatches == total // n and mb.pending == total % n
    # reference: Σ over consecutive minibatches of Song's HSIC₁ (partial last batch dropped)
    cross = sum(hsic_unbiased(torch.from_numpy(x[b:b + n] @ x[b:b + n].T),
                              torch.from_numpy(y[b:b + n] @ y[b:b + n].T)) for b in range(0, 2048, n))
    sx = sum(hsic_unbiased(*(torch.from_numpy(x[b:b + n] @ x[b:b + n].T),) * 2) for b in range(0, 2048, n))
    sy = sum(hsic_unbiased(*(torch.from_numpy(y[b:b + n] @ y[b:b + n].T),) * 2) for b in range(0, 2048, n))
    assert mb.result()[0, 0] == pytest.approx(cross / math.sqrt(sx * sy), rel=1e-9)
    full = cka_unbiased(x[:2048], y[:2048])
    assert abs(mb.result()[0, 0] - full) < 0.005, (mb.result()[0, 0], full)  # seeds 0-4: |diff| <= 0.0013
    with pytest.raises(ValueError, match="same examples"):
        mb.add([xt[:10]], [yt[:11]])


def test_soft_alignment_known_matrix() -> None:
    rng = np.random.default_rng(4)
    s = rng.uniform(0.0, 1.0, size=(8, 3))
    rows = np.arange(1, 9)  # layers 1..8
    got = soft_alignment(s, top=5, row_layers=rows)
    for j in range(3):
        ranked = sorted(range(8), key=lambda i: -s[i, j])[:5]
        want = sum(s[i, j] * rows[i] for i in ranked) / sum(s[i, j] for i in ranked)
        assert got[j] == pytest.approx(want, rel=1e-12)
    # worked by hand: rows (layers 1..8) 0.1..0.8, top-5 = layers 4..8: (1.6+2.5+3.6+4.9+6.4)/3.0 = 19/3
    ramp = np.linspace(0.1, 0.8, 8)[:, None]
    assert soft_alignment(ramp, top=5, row_layers=rows)[0] == pytest.approx(19.0 / 3.0, rel=1e-12)
    # top-1 is the arg-max row; top larger than the row count uses every row
    assert np.array_equal(soft_alignment(s, top=1), np.argmax(s, axis=0).astype(float))
    every = soft_alignment(s, top=50)
    assert every == pytest.approx((s * np.arange(8)[:, None]).sum(0) / s.sum(0), rel=1e-12)


# ----------------------------------------------------------------------------- models and data


def tiny_model(seed: int, engram: bool = True) -> EngramMoEModel:
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=3, max_seq_len=64)
    cfg.attention.num_heads = 2
    cfg.moe.num_routed_experts, cfg.moe.top_k, cfg.moe.expert_dim = 4, 2, 16
    cfg.hyper_connections.num_streams, cfg.hyper_connections.sinkhorn_iters = 2, 3
    e = cfg.engram
    e.layers = [1] if engram else []
    e.num_heads, e.d_mem, e.base_table_size, e.conv_zero_init = 2, 16, [101], False
    e.token_compression = False
    addressing = build_addressing(cfg, None) if engram else None
    torch.manual_seed(seed)
    model = EngramMoEModel(cfg, addressing).eval()
    for name, p in model.named_parameters():  # move the mHC gates off their tiny init
        if name.endswith("alpha"):
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "ds", vocab_size=96, num_docs=(20, 20))


def _cka_over_data(model_a: EngramMoEModel, model_b: EngramMoEModel, data: Path,
                   positions: int | None) -> MinibatchCKA:
    ds = DatasetDir(data)
    mb = MinibatchCKA(len(layer_ids(model_a)), len(layer_ids(model_b)), minibatch_size=48)
    select = TokenSelection(positions, seed=7)
    for b, ids in enumerate(validation_batches(ds, seq_len=32, batch_size=4, num_batches=4)):
        pos = select.positions(b, *ids.shape)
        mb.add(collect_hidden(model_a, ids, pos), collect_hidden(model_b, ids, pos))
    return mb


def test_identical_models_give_unit_diagonal(dataset: Path) -> None:
    a, b = tiny_model(seed=11), tiny_model(seed=11)
    mb = _cka_over_data(a, b, dataset, positions=None)
    s = mb.result()
    assert s.shape == (3, 3) and mb.num_minibatches == (4 * 4 * 32) // 48
    assert np.diag(s) == pytest.approx(np.ones(3), abs=1e-9)
    assert np.all(s <= 1.0 + 1e-9)
    assert np.allclose(s, s.T, atol=1e-9)  # same model on both axes: symmetric
    # a differently initialised model is not identical on the diagonal
    other = _cka_over_data(a, tiny_model(seed=12, engram=False), dataset, positions=None).result()
    assert np.all(np.diag(other) < 0.99)


def test_token_selection_is_shared_and_seeded(dataset: Path) -> None:
    sel = TokenSelection(per_sequence=5, seed=3)
    p0, p0_again, p1 = sel.positions(0, 4, 32), sel.positions(0, 4, 32), sel.positions(1, 4, 32)
    assert torch.equal(p0, p0_again) and not torch.equal(p0, p1)
    assert p0.shape == (4, 5) and all(len(set(r.tolist())) == 5 for r in p0)
    assert TokenSelection(None).positions(0, 4, 32) is None
    model = tiny_model(seed=1)
    ids = next(iter(validation_batches(DatasetDir(dataset), 32, 4, 1)))
    full = collect_hidden(model, ids, None)
    picked = collect_hidden(model, ids, p0)
    for h_full, h_pick in zip(full, picked, strict=True):
        want = torch.stack([h_full.view(4, 32, -1)[r, p0[r]] for r in range(4)]).reshape(20, -1)
        assert torch.equal(h_pick, want)
    # subset CKA of identical models still has a unit diagonal
    s = _cka_over_data(model, tiny_model(seed=1), dataset, positions=12).result()
    assert np.diag(s) == pytest.approx(np.ones(3), abs=1e-9)


def test_validation_batches_are_the_unshuffled_stream(dataset: Path) -> None:
    ds = DatasetDir(dataset)
    stream = np.concatenate([ds.split("valid")[0].get(i) for i in range(len(ds.split("valid")[0]))])
    batches = list(validation_batches(ds, seq_len=16, batch_size=3, num_batches=2))
    assert len(batches) == 2 and batches[0].shape == (3, 16) and batches[0].dtype == torch.int64
    for b, ids in enumerate(batches):
        for r in range(3):
            k = b * 3 + r
            assert np.array_equal(ids[r].numpy(), stream[k * 16:k * 16 + 16])


# ----------------------------------------------------------------------------- LogitLens


def test_logit_lens_matches_fp64_reference(dataset: Path) -> None:
    model = tiny_model(seed=5)
    ids = next(iter(validation_batches(DatasetDir(dataset), 32, 2, 1)))
    hidden = collect_hidden(model, ids, None, include_embedding=True)  # layers 0..3
    with torch.no_grad():
        logits = model(ids).logits.reshape(-1, model.config.vocab_size)
        assert torch.allclose(model.lm_head(model.norm(hidden[-1])), logits, atol=1e-5)
        ref_fwd, ref_rev = [], []
        log_final = torch.log_softmax(logits.double(), -1)
        for h in hidden:
            lp = torch.log_softmax(model.lm_head(model.norm(h)).double(), -1)
            ref_fwd.append(float((log_final.exp() * (log_final - lp)).sum(-1).mean()))
            ref_rev.append(float((lp.exp() * (lp - log_final)).sum(-1).mean()))
    for chunk in (7, 4096):
        lens = LogitLens.from_model(model, len(hidden), chunk_tokens=chunk)
        lens.update(hidden)
        r = lens.result()
        assert lens.num_tokens == 64
        assert r["kl_forward"][-1] == 0.0 and r["kl_reverse"][-1] == 0.0
        assert np.all(r["kl_forward"] >= 0) and np.all(r["kl_reverse"] >= 0)
        assert r["kl_forward"] == pytest.approx(ref_fwd, rel=1e-4, abs=1e-6)
        assert r["kl_reverse"] == pytest.approx(ref_rev, rel=1e-4, abs=1e-6)
    assert ref_fwd[0] > 1e-3  # the embedding's distribution differs from the final one


# ----------------------------------------------------------------------------- plots


def test_plots_write_png_and_data(tmp_path: Path) -> None:
    s = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.4], [0.1, 0.5, 0.95], [0.05, 0.3, 0.7]])
    align = soft_alignment(s, top=2, row_layers=[1, 2, 3, 4])
    out = plot_cka(s, [1, 2, 3, 4], [1, 2, 3], tmp_path / "fig" / "cka.png", "MoE", "Engram", align, top=2,
                   extra={"note": "x"})
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.reader(out["csv"].open()))
    assert rows[0][1:] == ["1", "2", "3"]
    assert np.array([[float(v) for v in r[1:]] for r in rows[1:5]]) == pytest.approx(s, abs=1e-6)
    data = json.loads(out["json"].read_text())
    assert np.array(data["cka"]) == pytest.approx(s) and data["layers_a"] == [1, 2, 3, 4]
    assert data["soft_alignment"] == pytest.approx(align.tolist()) and data["note"] == "x"

    curves = {"a": ([1, 2, 3], [2.0, 1.0, 0.0]), "b": ([0, 1, 2], [3.0, 1.5, 0.0])}
    out = plot_layer_curves(curves, tmp_path / "ll.png", "KL")
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.reader(out["csv"].open()))
    assert rows[0] == ["layer", "a", "b"] and rows[1] == ["0", "", "3"] and rows[3] == ["2", "1", "0"]
    assert json.loads(out["json"].read_text())["curves"]["b"]["values"] == [3.0, 1.5, 0.0]


# ----------------------------------------------------------------------------- loading and CLI


def _export(model: EngramMoEModel, data: Path, out: Path) -> Path:
    from engram_pretrain.export.exporter import export_model

    return export_model(model, None, data / "tokenizer", None, out)


def _fake_checkpoint(model: EngramMoEModel, root: Path, table_format: int = 2, ep_size: int = 1) -> Path:
    """A checkpoint in the trainer's layout (train/checkpoint/)
    without DeepSpeed optimizer partitions: the module file is read (ZeRO stage 0, or expert parallelism)."""
    from engram_pretrain.config import RunConfig, dump_config

    step = root / "checkpoints" / "step_7"
    (step / "ds").mkdir(parents=True)
    state = model.state_dict()
    tables = {layer: state.pop(f"blocks.{layer}.engram.table.weight") for layer in model.config.engram.layers}
    if table_format == 1:
        torch.save(tables, step / "tables.pt")
    else:
        (step / "tables").mkdir()
        for layer, weight in tables.items():  # two row ranges per table
            rows, half = weight.shape[0], weight.shape[0] // 2
            for start, end in ((0, half), (half, rows)):
                torch.save({"layer": layer, "num_rows": rows, "dim": weight.shape[1], "row_start": start,
                            "row_end": end, "weight": weight[start:end].clone()},
                           step / "tables" / f"table_{layer}_rows_{start}_{end}.pt")
    if ep_size > 1:  # the module file holds EP rank 0's experts; experts/ holds every rank's
        (step / "experts").mkdir()
        names = [k for k in state if k.endswith(("experts.w1", "experts.w3", "experts.w2"))]
        local = model.config.moe.num_routed_experts // ep_size
        for r in range(ep_size):
            shard = {name: state[name][r * local:(r + 1) * local].clone() for name in names}
            torch.save({"ep_size": ep_size, "ep_rank": r, "weights": shard,
                        "expert_range": [r * local, (r + 1) * local]},
                       step / "experts" / f"ep_rank_{r:05d}.pt")
        meta = {"ep_size": ep_size, "num_experts": ep_size * local, "weights": names}
        (step / "experts" / "meta.json").write_text(json.dumps(meta))
        state = {k: v[:local].clone() if k in names else v for k, v in state.items()}
    torch.save({"module": state}, step / "ds" / "mp_rank_00_model_states.pt")
    cfg = RunConfig()
    cfg.model = model.config
    dump_config(cfg, step / "config.yaml")
    trainer = {"format": table_format, "step": 7, "zero_stage": 2 if ep_size > 1 else 0, "world_size": 2}
    (step / "trainer.json").write_text(json.dumps(trainer))
    (step / "complete").write_text("{}")
    (root / "checkpoints" / "latest").write_text("step_7\n")
    return step


def test_load_model_from_export_and_checkpoint(dataset: Path, tmp_path: Path) -> None:
    model = tiny_model(seed=9)
    ids = next(iter(validation_batches(DatasetDir(dataset), 32, 2, 1)))
    with torch.no_grad():
        want = model(ids).logits
    paths = [_export(model, dataset, tmp_path / "hf"), _fake_checkpoint(model, tmp_path / "run")]
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints", paths[1]):  # run, checkpoint, step dirs
        assert resolve_checkpoint(where) == paths[1]
    paths.append(_fake_checkpoint(model, tmp_path / "run_v1", table_format=1))
    paths.append(_fake_checkpoint(model, tmp_path / "run_ep", ep_size=2))
    for path in paths:
        loaded = load_model(path, DatasetDir(dataset))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want), path
    with pytest.raises(ValueError, match="neither an exported"):
        load_model(tmp_path)


def test_cli_smoke(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engram_pretrain.cli import main

    moe = _export(tiny_model(seed=2, engram=False), dataset, tmp_path / "moe")
    eng = _export(tiny_model(seed=3), dataset, tmp_path / "engram")
    common = ["--data", str(dataset), "--batches", "2", "--batch-size", "2", "--seq-len", "32",
              "--device", "cpu"]
    rc = main(["analyze", "cka", str(moe), str(eng), *common, "--minibatch", "32",
               "--out", str(tmp_path / "c")])
    assert rc == 0
    res = json.loads((tmp_path / "c" / "cka.json").read_text())
    assert res["num_minibatches"] == 4 and len(res["cka"]) == 3 and len(res["soft_alignment"]) == 3
    assert (tmp_path / "c" / "cka.png").is_file() and (tmp_path / "c" / "cka.csv").is_file()
    assert "soft alignment" in capsys.readouterr().out
    rc = main(["analyze", "cka", str(eng), str(eng), *common, "--minibatch", "32", "--include-embedding",
               "--out", str(tmp_path / "self")])
    assert rc == 0
    res = json.loads((tmp_path / "self" / "cka.json").read_text())
    assert res["layers_a"] == [0, 1, 2, 3]
    assert np.diag(np.array(res["cka"])) == pytest.approx(np.ones(4), abs=1e-9)
    rc = main(["analyze", "logit-lens", str(moe), str(eng), *common, "--labels", "MoE", "Engram",
               "--out", str(tmp_path / "ll")])
    assert rc == 0
    data = json.loads((tmp_path / "ll" / "logit_lens.json").read_text())
    assert set(data["curves"]) == {"MoE", "Engram"} and data["curves"]["Engram"]["values"][-1] == 0.0
    assert (tmp_path / "ll" / "logit_lens_reverse.png").is_file()
    rc = main(["analyze", "cka", str(moe), str(eng), *common, "--minibatch", "4096", "--out", str(tmp_path)])
    assert rc == 2 and "minibatch" in capsys.readouterr().err
