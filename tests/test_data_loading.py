"""Packed samples, blending and loaders against straightforward Python references built here."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_pretrain.config import RunConfig
from engram_pretrain.data.blending import BlendedSamples
from engram_pretrain.data.indexed import IndexedDataset, IndexedDatasetBuilder
from engram_pretrain.data.loader import TrainBatches, ValidBatches, build_loaders
from engram_pretrain.data.packed import PackedSamples
from engram_pretrain.testing.distributed import run_distributed

EOD = 0
VOCAB = 500
T = 16


def make_shards(root: Path, name: str, docs_per_shard: list[int], seed: int, max_len: int = 40
                ) -> tuple[list[IndexedDataset], list[list[int]]]:
    """Random documents (each ending with EOD) in shards `root/name_XXXXX`; returns (shards, all docs)."""
    rng = np.random.default_rng(seed)
    docs: list[list[int]] = []
    shards = []
    for s, n in enumerate(docs_per_shard):
        prefix = root / f"{name}_{s:05d}"
        builder = IndexedDatasetBuilder(prefix, np.uint16)
        for _ in range(n):
            doc = [int(x) for x in rng.integers(1, VOCAB, int(rng.integers(1, max_len)))] + [EOD]
            builder.add_document(doc)
            docs.append(doc)
        builder.finalize()
        shards.append(IndexedDataset(prefix))
    return shards, docs


def windows(stream: list[int], seq_len: int) -> list[list[int]]:
    """Window k = stream[k*T : k*T + T + 1] for every complete window."""
    return [stream[k * seq_len : k * seq_len + seq_len + 1] for k in range((len(stream) - 1) // seq_len)]


class CountingSource:
    """Sample k of source `tag`: [tag, k, tag, k, ...] ([seq_len + 1] int64)."""

    def __init__(self, tag: int, seq_len: int = 3) -> None:
        self.tag, self.seq_len = tag, seq_len

    def __getitem__(self, k: int) -> np.ndarray:
        return np.array([self.tag, k] * (self.seq_len // 2 + 1), dtype=np.int64)[: self.seq_len + 1]


# ------------------------------------------------------------------------------- packing

@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[IndexedDataset], list[list[int]]]:
    return make_shards(tmp_path, "train", [23, 17], seed=0)


def test_epochs_pack_every_token_once_in_shuffled_document_order(corpus, tmp_path: Path) -> None:
    shards, docs = corpus
    ps = PackedSamples(shards, T, seed=3, cache_dir=tmp_path / "cache")
    orders = []
    for epoch in (0, 1):
        order = [int(d) for d in ps.document_order(epoch)]
        assert sorted(order) == list(range(len(docs)))
        orders.append(order)
        stream = [tok for d in order for tok in docs[d]]
        ref = windows(stream, T)
        assert len(ps) == len(ref) and len(stream) - (len(ref) * T + 1) < T  # only a < T tail is dropped
        got = [ps[epoch * len(ps) + i] for i in range(len(ps))]
        assert all(g.dtype == np.int64 and g.shape == (T + 1,) for g in got)
        by_window = {}
        for i, k in enumerate(ps.sample_order(epoch)):
            assert got[i].tolist() == ref[k]
            by_window[int(k)] = got[i].tolist()
        assert sorted(by_window) == list(range(len(ref)))  # each window exactly once per epoch
        flat = [tok for k in range(len(ref)) for tok in by_window[k][:T]] + [by_window[len(ref) - 1][-1]]
        assert flat == stream[: len(ref) * T + 1]
        for k in range(len(ref) - 1):  # consecutive windows share exactly the label-shift token
            assert by_window[k][-1] == by_window[k + 1][0]
            assert by_window[k][1:] == stream[k * T + 1 : k * T + T + 1]
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])
    assert list(ps.sample_order(0)) != list(ps.sample_order(1))


def test_same_seed_same_samples_different_seed_different_order(corpus, tmp_path: Path) -> None:
    shards, _ = corpus
    a = PackedSamples(shards, T, seed=5, cache_dir=tmp_path / "a")
    b = PackedSamples(shards, T, seed=5, cache_dir=None)
    c = PackedSamples(shards, T, seed=6, cache_dir=tmp_path / "a")
    idx = list(range(0, 3 * len(a), 5))
    assert all(np.array_equal(a[i], b[i]) for i in idx)
    assert list(a.document_order(0)) != list(c.document_order(0))
    assert any(not np.array_equal(a[i], c[i]) for i in idx)


def test_unshuffled_samples_follow_the_stream(corpus) -> None:
    shards, docs = corpus
    ps = PackedSamples(shards, T, seed=None)
    ref = windows([tok for d in docs for tok in d], T)
    for i in range(2 * len(ps)):  # every epoch identical
        assert ps[i].tolist() == ref[i % len(ps)]


def test_cache_is_reused_and_keyed_by_inputs(corpus, tmp_path: Path) -> None:
    shards, _ = corpus
    cache = tmp_path / "cache"
    first = PackedSamples(shards, T, seed=1, cache_dir=cache)
    assert first.num_index_builds == 1
    paths = first.index_paths(0)
    mtimes = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    first[len(first) + 2]  # epoch 1 is built lazily
    assert first.num_index_builds == 2 and all(p.exists() for p in first.index_paths(1).values())

    second = PackedSamples(shards, T, seed=1, cache_dir=cache)
    assert second.num_index_builds == 0
    assert {n: p.stat().st_mtime_ns for n, p in second.index_paths(0).items()} == mtimes
    for i in (0, 3, len(first) + 2):
        assert np.array_equal(first[i], second[i])
    assert second.num_index_builds == 0  # epoch 1 loaded too
    assert isinstance(second.document_order(0), np.memmap)

    other = PackedSamples(shards, T + 1, seed=1, cache_dir=cache)
    assert other.num_index_builds == 1 and other.index_paths(0)["doc"] != paths["doc"]
    assert not list(cache.glob("*.tmp"))

    moved, _ = make_shards(tmp_path / "copy", "train", [23, 17], seed=0)  # same names and sizes elsewhere
    assert PackedSamples(moved, T, seed=1, cache_dir=cache).num_index_builds == 0
    changed, _ = make_shards(tmp_path / "changed", "train", [23, 17], seed=1)  # same names, other sizes
    assert PackedSamples(changed, T, seed=1, cache_dir=cache).num_index_builds == 1


def test_too_short_split_is_a_clear_error(tmp_path: Path) -> None:
    shards, _ = make_shards(tmp_path, "tiny", [1], seed=0, max_len=3)
    with pytest.raises(ValueError, match="seq_len"):
        PackedSamples(shards, 64, seed=0)


def _construct_on_rank(rank: int, world_size: int, prefixes: list[str], cache: str) -> dict:
    import torch.distributed as dist

    shards = [IndexedDataset(p) for p in prefixes]
    dist.barrier()  # both ranks race for the build
    ps = PackedSamples(shards, T, seed=11, cache_dir=cache)
    return {"builds": ps.num_index_builds, "order": ps.document_order(0).tolist(),
            "shuffle": ps.sample_order(0).tolist(), "samples": [ps[i].tolist() for i in range(0, len(ps), 3)]}


def test_two_ranks_build_the_index_once_and_agree(corpus, tmp_path: Path) -> None:
    shards, _ = corpus
    prefixes = [str(s.prefix) for s in shards]
    results = run_distributed(_construct_on_rank, 2, args=(prefixes, str(tmp_path / "c")), timeout=120)
    assert sum(r["builds"] for r in results) == 1
    for key in ("order", "shuffle", "samples"):
        assert results[0][key] == results[1][key]


# ------------------------------------------------------------------------------- blending

def reference_blend(weights: list[float], n: int) -> list[tuple[int, int]]:
    """(source, index in source) of samples 0..n-1: exact-fraction 'furthest behind w_i * (n + 1)' rule."""
    total = sum(Fraction(w) for w in weights)
    share = [Fraction(w) / total for w in weights]
    taken = [0] * len(weights)
    out = []
    for step in range(n):
        errs = [share[i] * (step + 1) - taken[i] for i in range(len(weights))]
        best = errs.index(max(errs))
        out.append((best, taken[best]))
        taken[best] += 1
    return out


@pytest.mark.parametrize("weights", [[5, 3, 2], [1, 2], [1, 0, 1], [0.3, 0.7], [1]])
def test_blending_follows_the_greedy_rule(weights: list[float]) -> None:
    sources = [CountingSource(i) for i in range(len(weights))]
    blend = BlendedSamples(sources, weights)
    for n, (src, k) in enumerate(reference_blend(weights, 300)):
        assert blend.locate(n) == (src, k)
        assert blend[n].tolist() == sources[src][k].tolist()


@pytest.mark.parametrize("weights", [[0.123, 0.456, 0.421], [3.14159265, 2.71828183, 1.0], [1e-3, 1.0]])
def test_blending_shares_converge_and_are_deterministic(weights: list[float]) -> None:
    sources = [CountingSource(i) for i in range(len(weights))]
    blend, again = BlendedSamples(sources, weights), BlendedSamples(sources, weights)
    share = np.array(weights) / sum(weights)
    counts = np.zeros(len(weights), dtype=np.int64)
    for n in range(1, 40_001):
        src, k = blend.locate(n - 1)
        assert k == counts[src]  # each source is read in its own order
        counts[src] += 1
        if n % 997 == 0:
            assert np.all(np.abs(counts - share * n) < 3), (n, counts, share * n)
            assert np.array_equal(blend.source_counts(n), counts)
    far = [10**12 + j for j in range(50)]
    assert [blend.locate(n) for n in far] == [again.locate(n) for n in far]
    src, k = blend.locate(10**12)
    assert 0 < k and abs(k - share[src] * 10**12) < 10**12 / 2**15


# ------------------------------------------------------------------------------- loaders

def collect(loader: TrainBatches, steps: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(steps)]


def test_train_batches_shift_labels_and_rank_slices_tile_the_global_batch(corpus) -> None:
    shards, _ = corpus
    ps = PackedSamples(shards, T, seed=2)
    single = collect(TrainBatches(ps, micro_batch_size=6), 9)
    for world in (2, 3):
        per_rank = [collect(TrainBatches(ps, 6 // world, r, world), 9) for r in range(world)]
        for step in range(9):
            for key in ("input_ids", "labels"):
                assert torch.equal(torch.cat([b[step][key] for b in per_rank]), single[step][key])
    for step, batch in enumerate(single):
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (6, T)
        for j in range(6):
            assert batch["input_ids"][j].tolist() == ps[step * 6 + j][:T].tolist()
            assert batch["labels"][j].tolist() == ps[step * 6 + j][1:].tolist()


@pytest.mark.parametrize("blended", [False, True])
def test_resume_mid_epoch_and_across_epoch_boundary_is_exact(corpus, tmp_path: Path, blended: bool) -> None:
    shards, _ = corpus
    other, _ = make_shards(tmp_path, "other", [9], seed=1)

    def source(cache: Path):
        a = PackedSamples(shards, T, seed=4, cache_dir=cache)
        if not blended:
            return a
        return BlendedSamples([a, PackedSamples(other, T, seed=4, cache_dir=cache)], [0.7, 0.3])

    world, micro = 2, 3
    spe = len(PackedSamples(shards, T, seed=4))
    steps = 3 * spe // (world * micro) + 2  # about three epochs of the first source
    full = [collect(TrainBatches(source(tmp_path / "c"), micro, r, world), steps) for r in range(world)]
    boundary = spe // (world * micro)  # the batch after this one starts in epoch 1
    for stop in (5, boundary, boundary + 1):
        for r in range(world):
            first = TrainBatches(source(tmp_path / "c"), micro, r, world)
            collect(first, stop)
            state = json.loads(json.dumps(first.state_dict()))
            assert state["consumed_samples"] == stop * world * micro
            resumed = TrainBatches(source(tmp_path / "c"), micro, r, world)
            resumed.load_state_dict(state)
            rest = collect(resumed, steps - stop)
            for want, got in zip(full[r][stop:], rest, strict=True):
                assert torch.equal(want["input_ids"], got["input_ids"])
                assert torch.equal(want["labels"], got["labels"])


def test_load_state_dict_rejects_foreign_state(corpus) -> None:
    loader = TrainBatches(PackedSamples(corpus[0], T, seed=0), 2)
    with pytest.raises(ValueError, match="consumed_samples"):
        loader.load_state_dict({"step": 3})


def test_valid_batches_are_unshuffled_fixed_and_wrap(tmp_path: Path) -> None:
    shards, docs = make_shards(tmp_path, "valid", [6], seed=9)
    ps = PackedSamples(shards, T, seed=None)
    ref = windows([tok for d in docs for tok in d], T)
    micro, world, num = 2, 2, 5
    assert len(ref) < num * micro * world  # forces the wrap-around
    for r in range(world):
        loader = ValidBatches(ps, micro, r, world, num)
        first, second = list(loader), list(loader)
        assert len(first) == num == len(loader)
        for g, (a, b) in enumerate(zip(first, second, strict=True)):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            for j in range(micro):
                want = ref[(g * micro * world + r * micro + j) % len(ref)]
                assert a["input_ids"][j].tolist() == want[:T] and a["labels"][j].tolist() == want[1:]


# ------------------------------------------------------------------------------- build_loaders

def write_dataset_dir(root: Path, seed: int, fingerprint: str = "tok-A", vocab_size: int = VOCAB,
                      train_docs: int = 30, valid_docs: int = 5) -> Path:
    root.mkdir(parents=True)
    splits = {}
    for split, n in (("train", train_docs), ("valid", valid_docs)):
        shards, docs = make_shards(root, split, [n], seed=seed + (split == "valid"))
        splits[split] = {"shards": [f"{split}_00000"], "num_documents": len(docs),
                         "num_tokens": sum(map(len, docs))}
    meta = {"format": "engram-pretrain-dataset/1", "vocab_size": vocab_size, "eod_token_id": EOD,
            "pad_token_id": None, "dtype": "uint16", "tokenizer_fingerprint": fingerprint,
            "compression_map_fingerprint": "cm-" + fingerprint, "splits": splits, "sources": {},
            "skipped": {}, "versions": {}, "created": "2025-01-01T00:00:00"}
    (root / "metadata.json").write_text(json.dumps(meta))
    return root


def run_config(paths: list[Path], **train) -> RunConfig:
    cfg = RunConfig()
    cfg.data.paths = [str(p) for p in paths]
    cfg.data.seq_len = T
    cfg.train.micro_batch_size = 2
    cfg.train.eval_batches = 3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_build_loaders_blends_datasets_and_caches_indices(tmp_path: Path) -> None:
    a, b = write_dataset_dir(tmp_path / "a", seed=0), write_dataset_dir(tmp_path / "b", seed=10)
    cfg = run_config([a, b])
    cfg.data.weights = [3.0, 1.0]
    train, valid, ddir = build_loaders(cfg, rank=1, world_size=2)
    assert ddir.metadata["tokenizer_fingerprint"] == "tok-A"
    assert isinstance(train.samples, BlendedSamples) and train.samples.weights == [0.75, 0.25]
    batch = next(train)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, T)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert isinstance(valid, ValidBatches) and len(list(valid)) == 3
    assert list((a / ".index_cache").glob("*.npy")) and list((b / ".index_cache").glob("*.npy"))
    rank0, _, _ = build_loaders(cfg, rank=0, world_size=2)
    cfg_single = run_config([a, b], micro_batch_size=4)
    cfg_single.data.weights = [3.0, 1.0]
    single, _, _ = build_loaders(cfg_single, rank=0, world_size=1)
    assert torch.equal(torch.cat([next(rank0)["input_ids"], batch["input_ids"]]), next(single)["input_ids"])
    _, no_valid, _ = build_loaders(run_config([a], eval_interval=0), rank=0, world_size=1)
    assert no_valid is None


def test_build_loaders_errors_name_the_cause(tmp_path: Path) -> None:
    a = write_dataset_dir(tmp_path / "a", seed=0)
    with pytest.raises(ValueError, match="data.paths is empty"):
        build_loaders(run_config([]), 0, 1)
    with pytest.raises(ValueError, match=r"data.paths\[1\]"):
        build_loaders(run_config([a, tmp_path / "missing"]), 0, 1)
    other = write_dataset_dir(tmp_path / "b", seed=1, fingerprint="tok-B")
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        build_loaders(run_config([a, other]), 0, 1)
    big = write_dataset_dir(tmp_path / "big", seed=2, vocab_size=5000)
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_loaders(run_config([big]), 0, 1)
    short = write_dataset_dir(tmp_path / "short", seed=3, valid_docs=0)
    with pytest.raises(ValueError, match="valid split of dataset"):
        build_loaders(run_config([short]), 0, 1)
