"""data_prep: round trips over every input format, bad input, splits, workers, resume, metadata, sidecar."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer

from data_prep.__main__ import main as cli_main
from data_prep.pipeline import BuildOptions, build_dataset
from data_prep.sources import PieceReader, ReadOptions, resolve_inputs
from data_prep.tokenizer import EOD_TOKEN, install_tokenizer
from data_prep.validation import DataError
from engram_pretrain.config import load_config
from engram_pretrain.data.dataset_dir import DatasetDir, verify_sidecar
from engram_pretrain.data.indexed import IndexedDataset
from engram_pretrain.memory.compression import CompressionMap, identity_compression_map, tokenizer_fingerprint
from engram_pretrain.memory.reference_hash import NgramHasher

REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega café naïve 日本語 emoji🙂 def return import class").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 40)))
        text = " ".join(words)
        if i % 7 == 3:
            text += "\n\tindented line\r\nwindows line"
        if i % 11 == 5:
            text += f" literal {EOD_TOKEN} inside"
        docs.append(f"doc{i}: {text}")
    return docs


DOCS = make_docs(60)


@pytest.fixture(scope="module")
def tok_root(tmp_path_factory) -> Path:
    """A tiny byte-level BPE + compression map, trained once (builds reuse it by path)."""
    root = tmp_path_factory.mktemp("tok")
    install_tokenizer("bpe", root, iter(DOCS * 3), vocab_size=300)
    return root


@pytest.fixture(scope="module")
def tok(tok_root) -> Tokenizer:
    return Tokenizer.from_file(str(tok_root / "tokenizer" / "tokenizer.json"))


def build(tok_root: Path, out: Path, inputs: list[str], **kw) -> dict:
    kw.setdefault("workers", 0)
    kw.setdefault("valid_fraction", 0.0)
    kw.setdefault("progress", False)
    opts = BuildOptions(out=out, inputs=[str(i) for i in inputs], tokenizer=str(tok_root), **kw)
    return build_dataset(opts)


def read_split(out: Path, split: str, tok: Tokenizer) -> list[str]:
    """Decoded documents of a split; checks that each ends with exactly one EOD and holds no other."""
    meta = json.loads((out / "metadata.json").read_text())
    eod = meta["eod_token_id"]
    docs = []
    for shard in meta["splits"][split]["shards"]:
        ds = IndexedDataset(out / shard)
        for i in range(len(ds)):
            ids = ds[i].tolist()
            assert ids[-1] == eod and eod not in ids[:-1]
            docs.append(tok.decode(ids[:-1], skip_special_tokens=False))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def is_valid_ref(doc: str, fraction: float, seed: int) -> bool:
    """The documented split rule, written out independently."""
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=f"engram-split-{seed}".encode()).digest()
    return int.from_bytes(digest, "little") < int(fraction * 2**64)


# ----------------------------------------------------------------------------- round trips


def test_tokenizer_dir_loads_everywhere(tok_root):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_root / "tokenizer"))
    assert hf.eos_token == EOD_TOKEN and hf.eos_token_id == 0 and hf.pad_token_id == 2
    assert (tok_root / "tokenizer" / "special_tokens_map.json").exists()
    cmap = CompressionMap.load(tok_root / "compression_map.npz")
    cmap.verify(hf)


def test_round_trip_with_split_and_metadata(tmp_path, tok_root, tok):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    meta = build(tok_root, out, [tmp_path / "a.jsonl"], valid_fraction=0.3, split_seed=7)
    want_valid = [d for d in DOCS if is_valid_ref(d, 0.3, 7)]
    want_train = [d for d in DOCS if not is_valid_ref(d, 0.3, 7)]
    assert 0 < len(want_valid) < len(DOCS)
    assert read_split(out, "train", tok) == want_train
    assert read_split(out, "valid", tok) == want_valid

    # metadata counts against the shards and an independent tokenization
    for split, want in (("train", want_train), ("valid", want_valid)):
        shards = [IndexedDataset(out / s) for s in meta["splits"][split]["shards"]]
        assert meta["splits"][split]["num_documents"] == sum(len(s) for s in shards) == len(want)
        assert meta["splits"][split]["num_tokens"] == sum(s.num_tokens for s in shards)
    tok.encode_special_tokens = True
    n_tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in DOCS)
    tok.encode_special_tokens = False
    src = meta["sources"][str(tmp_path / "a.jsonl")]
    assert src["documents"] == len(DOCS) and src["tokens"] == n_tokens == meta["num_tokens"]
    assert meta["skipped"] == {}
    assert meta["format"] == "engram-pretrain-dataset/1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.get_vocab_size() and meta["eod_token_id"] == tok.token_to_id(EOD_TOKEN)
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    with np.load(out / "compression_map.npz") as z:
        lookup, v = z["lookup"], json.loads(str(z["meta"]))["compressed_vocab_size"]
    want_fp = hashlib.sha256(lookup.astype("<i8").tobytes() + f":{v}".encode()).hexdigest()
    assert meta["compression_map_fingerprint"] == want_fp
    assert {"tokenizers", "numpy", "python"} <= set(meta["versions"])

    ds = DatasetDir(out)
    assert ds.eod_token_id == 0 and ds.vocab_size == tok.get_vocab_size()
    assert ds.compression_map().vocab_size == ds.vocab_size
    assert [len(s) for s in ds.split("train")] == [len(want_train)]


def test_every_input_format(tmp_path, tok_root, tok):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    parts = [DOCS[i:i + 6] for i in range(0, 60, 6)]
    write_jsonl(d / "a.jsonl", parts[0])
    b_lines = "".join(json.dumps({"text": x}) + "\n" for x in parts[1])
    (d / "b.jsonl.gz").write_bytes(gzip.compress(b_lines.encode()))
    zs = zstandard.ZstdCompressor()
    body = "".join(json.dumps({"body": {"text": x}}) + "\n" for x in parts[2]).encode()
    (d / "c.ndjson.zst").write_bytes(zs.compress(body[: len(body) // 2]) + zs.compress(body[len(body) // 2:]))
    (d / "d.json").write_text(json.dumps([{"text": x} for x in parts[3]], indent=1))
    write_jsonl(d / "e.json", parts[4])  # .json holding JSON lines
    pq.write_table(pa.table({"text": parts[5]}), d / "f.parquet", row_group_size=4)
    for i, x in enumerate(parts[6]):
        (d / "sub" / f"g{i}.txt").write_text(x)
    (d / "sub" / "h.txt.bz2").write_bytes(bz2.compress(parts[7][0].encode()))
    (d / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    (d / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    nested = [x for x in parts[2]]
    # sorted path order: a, b, c, d, e, f, sub/g0..g5, sub/h
    want = parts[0] + parts[1] + nested + parts[3] + parts[4] + parts[5] + parts[6] + parts[7][:1]

    out = tmp_path / "dir"
    meta = build(tok_root, out, [d], read=ReadOptions(text_field="text"))
    got = read_split(out, "train", tok)
    # c.ndjson.zst keeps its text under body.text: a dotted field reads it, "text" alone does not
    assert meta["sources"][str(d)]["skipped"] == {"missing_field": 6}
    assert got == [x for x in want if x not in nested]
    out2 = tmp_path / "dotted"
    build(tok_root, out2, [d / "c.ndjson.zst"], read=ReadOptions(text_field="body.text"))
    assert read_split(out2, "train", tok) == nested

    # globs: same files, same order
    out3 = tmp_path / "glob"
    build(tok_root, out3, [f"{d}/sub/g*.txt", f"{d}/[ab].json*"])
    assert read_split(out3, "train", tok) == parts[6] + parts[0] + parts[1]

    # plain text, one document per line, compressed
    (tmp_path / "lines.txt.gz").write_bytes(gzip.compress(("\n\n".join(parts[8]) + "\n").encode()))
    out4 = tmp_path / "lines"
    build(tok_root, out4, [tmp_path / "lines.txt.gz"], read=ReadOptions(text_unit="line"))
    want_lines = [ln.rstrip("\r") for x in parts[8] for ln in x.split("\n") if ln.strip()]
    assert read_split(out4, "train", tok) == want_lines


def test_byte_ranges_split_lines_exactly(tmp_path, tok_root, tok):
    """Tiny pieces (line starts on, before and after range boundaries) give the same documents."""
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.txt").write_text("\n".join(DOCS[:20]) + "\n")
    whole = build(tok_root, tmp_path / "whole", [tmp_path / "a.jsonl"])
    for piece_bytes in (13, 100, 256):
        out = tmp_path / f"p{piece_bytes}"
        meta = build(tok_root, out, [tmp_path / "a.jsonl"], piece_bytes=piece_bytes)
        assert meta["build"]["num_pieces"] > 1
        assert read_split(out, "train", tok) == DOCS
        assert meta["num_tokens"] == whole["num_tokens"]
        out_t = tmp_path / f"t{piece_bytes}"
        build(tok_root, out_t, [tmp_path / "b.txt"], piece_bytes=piece_bytes,
              read=ReadOptions(text_unit="line"))
        lines = [ln for d in DOCS[:20] for ln in d.replace("\r", "").split("\n") if ln.strip()]
        assert read_split(out_t, "train", tok) == lines


# ----------------------------------------------------------------------------- bad input


def _bad_jsonl(path: Path) -> dict[str, int]:
    lines = [
        json.dumps({"text": DOCS[0]}).encode(),
        b'{"text": "unterminated',                       # invalid_json (line 2)
        json.dumps({"other": "x"}).encode(),            # missing_field
        json.dumps({"text": None}).encode(),            # missing_field
        json.dumps(["not", "an", "object"]).encode(),   # missing_field
        json.dumps({"text": 42}).encode(),              # not_string
        b'{"text": "caf\xe9 latin-1"}',                  # non_utf8
        b'{"text": "lone \\ud800 surrogate"}',          # non_utf8 (after JSON unescaping)
        json.dumps({"text": "   \n\t "}).encode(),      # empty
        json.dumps({"text": "bin\u0000ary"}).encode(),  # binary
        json.dumps({"text": "\u0001\u0002" * 10 + "x"}).encode(),  # binary (control characters)
        json.dumps({"text": "x" * 500}).encode(),       # too_large (limit 400)
        b"",                                            # blank line: not a record
        json.dumps({"text": DOCS[1]}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"invalid_json": 1, "missing_field": 3, "not_string": 1, "non_utf8": 2, "empty": 1, "binary": 2,
            "too_large": 1}


def test_bad_inputs_counted_and_nothing_valid_lost(tmp_path, tok_root, tok):
    want = _bad_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.txt").write_bytes("ok line\nbad \xe9 byte\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    good_gz = "".join(json.dumps({"text": x}) + "\n" for x in DOCS[2:8]).encode()
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(good_gz * 50)[:-30])  # truncated archive
    out = tmp_path / "out"
    meta = build(tok_root, out, [tmp_path / "bad.jsonl", tmp_path / "latin1.txt", tmp_path / "empty.txt",
                                 tmp_path / "trunc.jsonl.gz"], read=ReadOptions(max_document_bytes=400))
    src = meta["sources"]
    assert src[str(tmp_path / "bad.jsonl")]["skipped"] == want
    assert src[str(tmp_path / "bad.jsonl")]["examples"]["invalid_json"] == [f"{tmp_path / 'bad.jsonl'}:2"]
    assert src[str(tmp_path / "latin1.txt")]["skipped"] == {"non_utf8": 1}
    assert src[str(tmp_path / "latin1.txt")]["examples"]["non_utf8"] == [f"{tmp_path / 'latin1.txt'}:2"]
    assert src[str(tmp_path / "empty.txt")]["skipped"] == {"empty": 1}
    assert src[str(tmp_path / "trunc.jsonl.gz")]["skipped"] == {"unreadable": 1}
    total = dict(want)
    total.update(non_utf8=3, empty=2, unreadable=1)
    assert meta["skipped"] == total
    got = read_split(out, "train", tok)
    assert got[:2] == [DOCS[0], DOCS[1]]
    rest = got[2:]  # everything decompressed before the truncation point survives, in order
    assert len(rest) >= 6 * 40 and rest == (DOCS[2:8] * 50)[: len(rest)]


def test_strict_mode_names_file_and_line(tmp_path, tok_root):
    _bad_jsonl(tmp_path / "bad.jsonl")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid_json"):
        build(tok_root, out, [tmp_path / "bad.jsonl"], strict=True)
    assert not (out / "metadata.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".bin", ".idx"))]
    rc = cli_main(["build", str(tmp_path / "bad.jsonl"), "--out", str(out), "--tokenizer", str(tok_root),
                   "--workers", "0", "--strict", "--no-progress"])
    assert rc == 2


def test_strict_line_numbers_inside_later_pieces(tmp_path, tok_root):
    lines = [json.dumps({"text": d}) for d in DOCS]
    lines[41] = "{broken"
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:42: invalid_json"):
        build(tok_root, tmp_path / "o", [tmp_path / "a.jsonl"], strict=True, piece_bytes=200)
    with pytest.raises(DataError, match=r"a\.jsonl:42: invalid_json"):
        build(tok_root, tmp_path / "o2", [tmp_path / "a.jsonl"], strict=True, piece_bytes=200, workers=2)
    assert not multiprocessing.active_children()  # the workers were stopped, not left blocked


def test_bad_specs_raise(tmp_path, tok_root):
    with pytest.raises(ValueError, match="no such file"):
        build(tok_root, tmp_path / "o", [tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="glob matches no files"):
        build(tok_root, tmp_path / "o", [f"{tmp_path}/*.nothing"])


# ----------------------------------------------------------------------------- determinism, reruns


def _dataset_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}


def _meta_without_time(out: Path) -> dict:
    meta = json.loads((out / "metadata.json").read_text())
    meta.pop("created")
    return meta


def test_workers_do_not_change_the_dataset(tmp_path, tok_root):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        write_jsonl(d / f"part{i}.jsonl", make_docs(30, seed=i))
    kw = dict(valid_fraction=0.2, piece_bytes=700, shard_tokens=1500)
    build(tok_root, tmp_path / "w0", [d], workers=0, **kw)
    build(tok_root, tmp_path / "w2", [d], workers=2, **kw)
    files = _dataset_files(tmp_path / "w0")
    assert len([f for f in files if f.startswith("train")]) > 2
    assert files == _dataset_files(tmp_path / "w2")
    assert _meta_without_time(tmp_path / "w0") == _meta_without_time(tmp_path / "w2")


def test_rerun_is_a_noop_and_overwrite_is_explicit(tmp_path, tok_root):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "out"
    first = build(tok_root, out, [tmp_path / "a.jsonl"])
    mtime = (out / "train_00000.bin").stat().st_mtime_ns
    assert build(tok_root, out, [tmp_path / "a.jsonl"]) == first
    assert (out / "train_00000.bin").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="--overwrite"):
        build(tok_root, out, [tmp_path / "a.jsonl"], valid_fraction=0.5)
    meta = build(tok_root, out, [tmp_path / "a.jsonl"], valid_fraction=0.5, overwrite=True)
    assert meta["splits"]["valid"]["num_documents"] > 0


def _feed_fifo(path: Path, data: bytes, deadline: float) -> threading.Thread:
    """Write `data` into the FIFO once a reader opens it (gives up at `deadline`)."""
    def run() -> None:
        while time.time() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            os.set_blocking(fd, True)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tok_root):
    """Kill a build while it waits on its last input (a FIFO); the rerun finishes it byte-identically."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        write_jsonl(d / f"p{i}.jsonl", make_docs(25, seed=10 + i))
    fifo = d / "z_pipe.jsonl"
    os.mkfifo(fifo)
    fifo_data = "".join(json.dumps({"text": x}) + "\n" for x in make_docs(20, seed=99)).encode()
    kw = dict(valid_fraction=0.2, piece_bytes=600, shard_tokens=400)
    pieces = resolve_inputs([str(d)], ReadOptions(), piece_bytes=600)
    assert pieces[-1].path == str(fifo) and len(pieces) > 4

    _feed_fifo(fifo, fifo_data, time.time() + 60)
    build(tok_root, tmp_path / "ref", [d], **kw)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "build", str(d), "--out", str(out), "--tokenizer",
           str(tok_root), "--workers", "0", "--valid-fraction", "0.2", "--piece-bytes", "600",
           "--shard-tokens", "400", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if progress.exists() and json.loads(progress.read_text())["next_piece"] == len(pieces) - 1:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    state = json.loads(progress.read_text())
    listed = {s for v in state["shards"].values() for s in v}
    complete = {p.name[:-4] for p in out.glob("*.idx")}
    assert complete == listed and len(listed) >= 2  # nothing unlisted looks complete
    assert not (out / "metadata.json").exists()
    kept_mtime = (out / "train_00000.bin").stat().st_mtime_ns
    # leftovers a kill at another moment could leave: a temp file and a finalized shard past the checkpoint
    (out / "train_00099.bin.tmp").write_bytes(b"junk")
    next_train = f"train_{len(state['shards']['train']):05d}"
    shutil.copy(out / "train_00000.bin", out / f"{next_train}.bin")
    shutil.copy(out / "train_00000.idx", out / f"{next_train}.idx")

    _feed_fifo(fifo, fifo_data, time.time() + 60)
    build(tok_root, out, [d], **kw)
    assert (out / "train_00000.bin").stat().st_mtime_ns == kept_mtime  # resumed, not rebuilt
    assert _dataset_files(out) == _dataset_files(tmp_path / "ref")
    assert _meta_without_time(out) == _meta_without_time(tmp_path / "ref")
    assert not progress.exists() and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- sources


def test_default_corpus(tmp_path):
    pieces = resolve_inputs(["default"], ReadOptions())
    assert {p.source for p in pieces} == {"kjv-bible", "python-stdlib"}
    total = sum(p.nbytes for p in pieces)
    assert 8e6 < total < 13e6
    kjv = [p for p in pieces if p.source == "kjv-bible"]
    assert len(kjv) > 2  # chapter-aligned byte ranges, so workers share the Bible
    chapters = [r for p in kjv for r in PieceReader(p, ReadOptions())]
    assert all(r[2] is None for r in chapters)
    assert len(chapters) == 1189  # chapters of the King James Bible
    assert chapters[0][0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    code = [p for p in pieces if p.source == "python-stdlib"]
    assert all("/test" not in f for p in code for f in p.files)


def test_hf_datasets_streaming_local(tmp_path, tok_root, tok, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "hfdata"
    d.mkdir()
    write_jsonl(d / "train.jsonl", DOCS[:10])
    out = tmp_path / "out"
    meta = build(tok_root, out, [f"hf:{d}?split=train"])
    assert read_split(out, "train", tok) == DOCS[:10]
    assert meta["sources"][f"hf:{d}?split=train"]["documents"] == 10


def test_cli_help_and_inspect(tmp_path, tok_root, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert "build" in capsys.readouterr().out
    write_jsonl(tmp_path / "a.jsonl", DOCS[:5])
    out = tmp_path / "out"
    assert cli_main(["build", str(tmp_path / "a.jsonl"), "--out", str(out), "--tokenizer", str(tok_root),
                     "--workers", "0", "--valid-fraction", "0", "--no-progress"]) == 0
    assert cli_main(["inspect", str(out), "--chars", "40"]) == 0
    assert DOCS[0][:40] in capsys.readouterr().out


def test_incomplete_dataset_is_rejected(tmp_path):
    (tmp_path / "progress.json").write_text("{}")
    with pytest.raises(ValueError, match="incomplete or not a dataset"):
        DatasetDir(tmp_path)


# ----------------------------------------------------------------------------- sidecar


def _ref_rows(raw: list[int], lookup: np.ndarray, pad: int, mult: list[int], sizes: list[int], max_ngram: int,
              heads: int, eod: int | None) -> np.ndarray:
    """Straightforward per-position loop of the Engram hash on a token stream."""
    x = [int(lookup[t]) for t in raw]
    out = np.zeros((len(raw), (max_ngram - 1) * heads), dtype=np.int64)
    for t in range(len(raw)):
        def tok_at(k: int, t: int = t) -> int:
            if t - k < 0:
                return pad
            if eod is not None and any(raw[j] == eod for j in range(t - k, t)):
                return pad  # crosses the end of a document
            return x[t - k]
        for n in range(2, max_ngram + 1):
            mix = 0
            for k in range(n):
                mix ^= tok_at(k) * mult[k]
            for h in range(heads):
                out[t, (n - 2) * heads + h] = mix % sizes[(n - 2) * heads + h]
    return out


@pytest.mark.parametrize("reset", [False, True])
def test_sidecar_rows_match_reference_and_device_hashing(tmp_path, tok_root, reset):
    from data_prep.sidecar import write_sidecar

    write_jsonl(tmp_path / "a.jsonl", DOCS[:25])
    out = tmp_path / "out"
    build(tok_root, out, [tmp_path / "a.jsonl"], valid_fraction=0.3)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "model.vocab_size=320", "model.engram.layers=[1, 2]", "model.engram.num_heads=2",
        "model.engram.d_mem=8", "model.engram.base_table_size=[31, 70000]", "model.engram.seed=5",
        f"model.engram.reset_at_doc_boundary={str(reset).lower()}"]).model
    manifest = write_sidecar(out, cfg, chunk_tokens=37, progress=False)
    assert manifest["engram"]["dtype"] == "int32"  # a prime above 2**16
    ds = DatasetDir(out)
    cmap = ds.compression_map()
    lookup = np.concatenate([cmap.lookup, np.full(cfg.vocab_size - cmap.vocab_size, cmap.lookup[2])])
    pad = int(cmap.lookup[cfg.engram.pad_token_id])
    hasher = NgramHasher([1, 2], 3, 2, [31, 70000], cmap.compressed_vocab_size, pad, seed=5)
    side = ds.sidecar(cfg, checksums=True)
    for split in ("train", "valid"):
        for shard in ds.shard_names(split):
            raw = IndexedDataset(out / shard).tokens().tolist()
            for layer in (1, 2):
                want = _ref_rows(raw, lookup, pad, hasher.multipliers[layer].tolist(),
                                 hasher.head_sizes(layer), 3, 2, ds.eod_token_id if reset else None)
                np.testing.assert_array_equal(side.rows(shard, layer), want)

    # a packed sample starting mid-stream: on-device rows equal the sidecar from position N-1 on
    raw = IndexedDataset(out / "train_00000").tokens()
    s, T = 53, 64
    sample = torch.as_tensor(raw[s:s + T].astype(np.int64))[None]
    seg = None
    if reset:
        from engram_pretrain.memory.reference_hash import segment_ids_from_eod

        seg = segment_ids_from_eod(sample, ds.eod_token_id)
    device = hasher.hash(cmap.compress(sample), 1, seg)[0].numpy()
    stored = side.rows("train_00000", 1)[s + side.valid_from:s + T]
    np.testing.assert_array_equal(device[side.valid_from:], stored)


def test_sidecar_mismatch_detection(tmp_path, tok_root):
    from data_prep.sidecar import write_sidecar

    write_jsonl(tmp_path / "a.jsonl", DOCS[:10])
    out = tmp_path / "out"
    build(tok_root, out, [tmp_path / "a.jsonl"])
    overrides = ["model.vocab_size=320", "model.engram.layers=[1]", "model.engram.num_heads=2",
                 "model.engram.d_mem=8", "model.engram.base_table_size=[31]"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides).model
    write_sidecar(out, cfg, progress=False)
    manifest = verify_sidecar(out, cfg)
    assert manifest["engram"]["layers"] == [1] and manifest["engram"]["dtype"] == "uint16"
    for change, what in (("model.engram.seed=1", "seed"), ("model.engram.layers=[1, 2]", "layers"),
                         ("model.engram.max_ngram=2", "max_ngram"),
                         ("model.engram.token_compression=false", "token_compression")):
        other = load_config(REPO / "configs" / "tiny.yaml", overrides + [change]).model
        with pytest.raises(ValueError, match=what):
            verify_sidecar(out, other)
    rows = next((out / "engram_rows").glob("*.npy"))
    data = bytearray(rows.read_bytes())
    data[-1] ^= 0xFF
    rows.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        verify_sidecar(out, cfg)
    verify_sidecar(out, cfg, checksums=False)  # shapes still fine
    identity_compression_map(320).save(out / "compression_map.npz")
    with pytest.raises(ValueError, match="compression map"):
        verify_sidecar(out, cfg)


def test_tokenizer_json_file_spec(tmp_path, tok_root, tok):
    from transformers import AutoTokenizer

    src = tmp_path / "my_tokenizer.json"
    shutil.copy(tok_root / "tokenizer" / "tokenizer.json", src)
    write_jsonl(tmp_path / "a.jsonl", DOCS[:5])
    out = tmp_path / "out"
    meta = build_dataset(BuildOptions(out=out, inputs=[str(tmp_path / "a.jsonl")], tokenizer=str(src),
                                      workers=0, valid_fraction=0.0, progress=False))
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) and meta["eod_token_id"] == 0
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).eos_token == EOD_TOKEN
    assert read_split(out, "train", tok) == DOCS[:5]


@pytest.mark.slow
def test_deepseek_v4_tokenizer(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:8])
    out = tmp_path / "out"
    meta = build_dataset(BuildOptions(out=out, inputs=[str(tmp_path / "a.jsonl")], tokenizer="deepseek-v4",
                                      workers=0, valid_fraction=0.0, progress=False))
    assert meta["vocab_size"] == 129280 and meta["dtype"] == "int32" and meta["eod_token_id"] == 1
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert read_split(out, "train", tok) == DOCS[:8]
    assert DatasetDir(out).compression_map().compressed_vocab_size < 129280
