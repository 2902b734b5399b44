"""Data-prep throughput and memory: the full pipeline vs raw `tokenizers` batch encoding.

1. Throughput: the default corpus (KJV chapters + Python stdlib), repeated to ``--mb`` MB of JSON lines.
   Raw = ``Tokenizer.encode_batch`` (and ``encode_batch_fast``) over the same documents, already in memory,
   in 1 MiB batches, with ``RAYON_NUM_THREADS`` = workers. Pipeline = ``build_dataset`` end to end (reading,
   JSON parsing, validation, split hashing, tokenizing in ``workers`` processes, writing shards and
   metadata). Goal: pipeline / raw >= 0.8.
2. Memory: synthetic corpora of ``--rss-mb`` sizes, built by ``python -m data_prep build`` in a
   subprocess; peak resident memory of the whole process tree (main + workers), sampled every 50 ms.
   Bounded streaming means the peak does not grow with the corpus.

Usage (repo root): python -m benchmarks.data_prep_throughput [--workers 1 2] [--mb 32] [--rss-mb 50 250]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _raw(jsonl: str, tokenizer_json: str, batch_bytes: int) -> None:
    """Child mode: time raw batch encoding of the documents of `jsonl` (RAYON_NUM_THREADS from env)."""
    from tokenizers import Tokenizer

    docs = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]
    batches, cur, size = [], [], 0
    for d in docs:
        cur.append(d)
        size += len(d)
        if size >= batch_bytes:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        fn = getattr(tok, name)
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(len(e) for b in batches for e in fn(b, add_special_tokens=False))
        out[name] = {"tokens": n, "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    print(json.dumps(out))


def _corpus_docs() -> list[str]:
    from data_prep.sources import PieceReader, ReadOptions, resolve_inputs

    return [r[0] for p in resolve_inputs(["default"], ReadOptions()) for r in PieceReader(p, ReadOptions())
            if r[2] is None]


def _write_jsonl(path: Path, docs: list[str], target_bytes: int) -> int:
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            for d in docs:
                line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= target_bytes:
                    break
    return written


def _synthetic(path: Path, target_bytes: int, words: list[str], seed: int = 0) -> None:
    """Random documents of 50..2000 words drawn from `words` (deterministic)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            lens = rng.integers(50, 2000, size=256)
            flat = vocab[rng.integers(0, len(vocab), size=int(lens.sum()))]
            pos = 0
            for n in lens:
                line = json.dumps({"text": " ".join(flat[pos:pos + n])}) + "\n"
                pos += n
                f.write(line)
                written += len(line)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _peak_rss_build(cmd: list[str]) -> tuple[int, float]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode())
    return peak[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mb", type=float, default=32, help="throughput corpus size (MB of JSON lines)")
    ap.add_argument("--rss-mb", type=float, nargs="*", default=[50, 250], help="memory test corpus sizes")
    ap.add_argument("--rss-workers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of each measurement (noisy hosts)")
    ap.add_argument("--raw", nargs=3, metavar=("JSONL", "TOKENIZER", "BATCH_BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw:
        _raw(args.raw[0], args.raw[1], int(args.raw[2]))
        return

    from data_prep.pipeline import BuildOptions, build_dataset
    from data_prep.tokenizer import install_tokenizer

    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp_str:
        tmp = Path(tmp_str)
        docs = _corpus_docs()
        print(f"training BPE vocab {args.vocab} on the default corpus ({len(docs)} documents)...", flush=True)
        install_tokenizer("bpe", tmp / "tok", iter(docs), vocab_size=args.vocab)
        tok_json = str(tmp / "tok" / "tokenizer" / "tokenizer.json")
        corpus = tmp / "corpus.jsonl"
        nbytes = _write_jsonl(corpus, docs, int(args.mb * 1e6))
        batch_bytes = 1 << 20

        rows = []
        for w in args.workers:
            env = dict(os.environ, RAYON_NUM_THREADS=str(w), TOKENIZERS_PARALLELISM="true")
            cmd = [sys.executable, "-m", "benchmarks.data_prep_throughput", "--raw", str(corpus), tok_json,
                   str(batch_bytes)]
            raw: dict = {}
            for _ in range(args.repeat):
                res = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
                for name, r in json.loads(res.stdout.strip().splitlines()[-1]).items():
                    best = raw.setdefault(name, r)
                    for key in ("seconds", "cpu"):
                        best[key] = min(best[key], r[key])
            seconds = cpu = float("inf")
            for rep in range(args.repeat):
                out = tmp / f"out_w{w}_{rep}"
                t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
                meta = build_dataset(BuildOptions(out=out, inputs=[str(corpus)], tokenizer=str(tmp / "tok"),
                                                  workers=w, progress=False, batch_bytes=batch_bytes))
                seconds = min(seconds, time.perf_counter() - t0)
                cpu = min(cpu, time.process_time() - c0 + _children_cpu() - k0)  # main + joined workers
                shutil.rmtree(out)
            pipe = meta["num_tokens"] - meta["num_documents"]  # EODs are not tokenizer output
            rows.append((w, raw, pipe, seconds, cpu))

        print(f"\nthroughput: {nbytes / 1e6:.1f} MB of JSON lines, {os.cpu_count()} CPUs, "
              f"BPE vocab {args.vocab}; tokens/s of wall time, and tokens per CPU-second in brackets")
        print(f"{'workers':>7} {'raw encode_batch':>22} {'raw encode_batch_fast':>22} {'pipeline':>22} "
              f"{'ratio':>6} {'vs _fast':>8} {'CPU ratio':>9}")
        for w, raw, pipe, seconds, cpu in rows:
            assert raw["encode_batch"]["tokens"] == pipe, (raw, pipe)
            r1, r2 = raw["encode_batch"], raw["encode_batch_fast"]
            w1, w2, wp = pipe / r1["seconds"], pipe / r2["seconds"], pipe / seconds
            c1, c2, cp = pipe / r1["cpu"], pipe / r2["cpu"], pipe / cpu
            cell = "{:>8.3f}M/s ({:.3f}M)".format
            print(f"{w:>7} {cell(w1 / 1e6, c1 / 1e6):>22} {cell(w2 / 1e6, c2 / 1e6):>22} "
                  f"{cell(wp / 1e6, cp / 1e6):>22} {wp / w1:>6.2f} {wp / w2:>8.2f} {cp / max(c1, c2):>9.2f}")

        if args.rss_mb:
            words = sorted({w for d in docs[:200] for w in d.split()})
            print(f"\npeak RSS of the build process tree ({args.rss_workers} workers; sampled every 50 ms)")
            print(f"{'corpus':>9} {'peak RSS':>10} {'seconds':>8}")
            for mb in args.rss_mb:
                path = tmp / f"synthetic_{mb:g}.jsonl"
                _synthetic(path, int(mb * 1e6), words)
                cmd = [sys.executable, "-m", "data_prep", "build", str(path), "--out",
                       str(tmp / f"rss_{mb:g}"), "--tokenizer", str(tmp / "tok"), "--workers",
                       str(args.rss_workers), "--no-progress"]
                peak, secs = _peak_rss_build(cmd)
                print(f"{os.path.getsize(path) / 1e6:>7.0f}MB {peak / 2**20:>8.0f}MiB {secs:>8.1f}")
                path.unlink()


if __name__ == "__main__":
    main()
