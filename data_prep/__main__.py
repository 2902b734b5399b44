"""Prepare pretraining data: tokenize and shard corpora (the CLI behind `make data` and `make tokenizer`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .sources import DEFAULT_CODE_BYTES, ReadOptions
from .validation import DataError

EPILOG = """\
inputs: files (.jsonl .ndjson .json .parquet, anything else is text; optionally .gz .zst .bz2 .xz),
directories, globs (quote them), hf:NAME[?config=C&split=S], or `default` (KJV Bible + Python stdlib).

examples:
  python -m data_prep build --out data/default                       # bundled corpus, BPE vocab 4096
  python -m data_prep build 'corpus/*.jsonl.zst' --out data/web --tokenizer deepseek-v4 --workers 16
  python -m data_prep build books/ --text-unit document --out data/books --tokenizer data/default
  python -m data_prep inspect data/default
  python -m data_prep sidecar data/default --config configs/tiny.yaml
"""


def _int(text: str) -> int:
    """Integers with optional k/M/G suffixes (powers of 10 for tokens, e.g. 100M)."""
    mult = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=["default"], help="input specs (default: `default`)")
    p.add_argument("--out", required=True, type=Path, help="dataset directory")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (train) | deepseek-v4 | tokenizer or dataset dir | tokenizer.json | HF hub name")
    p.add_argument("--vocab-size", type=_int, default=4096, help="BPE vocabulary size (default 4096)")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: the eos_token)")
    p.add_argument("--text-field", default="text", help="JSON/parquet/HF field with the text (dotted: a.b)")
    p.add_argument("--text-unit", choices=["document", "line"], default="document",
                   help="plain text: one document per file (default) or per non-blank line")
    p.add_argument("--max-document-bytes", type=_int, default=64 << 20,
                   help="skip longer documents as too_large (default 64 MiB)")
    p.add_argument("--tokenizer-train-bytes", type=_int, default=200 << 20,
                   help="BPE training reads at most this many bytes of documents")
    p.add_argument("--default-code-bytes", type=_int, default=DEFAULT_CODE_BYTES,
                   help="Python stdlib bytes in the `default` corpus")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset/tokenizer in --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")


def _build_options(args: argparse.Namespace):
    from .pipeline import BuildOptions

    read = ReadOptions(text_field=args.text_field, text_unit=args.text_unit,
                       max_document_bytes=args.max_document_bytes)
    kw = dict(out=args.out, inputs=args.inputs, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
              eod_token=args.eod_token, read=read, tokenizer_train_bytes=args.tokenizer_train_bytes,
              default_code_bytes=args.default_code_bytes, overwrite=args.overwrite, progress=args.progress)
    for name in ("workers", "valid_fraction", "split_seed", "shard_tokens", "piece_bytes", "strict"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    return BuildOptions(**kw)


def cmd_build(args: argparse.Namespace) -> int:
    from .pipeline import build_dataset, format_report

    meta = build_dataset(_build_options(args))
    print(format_report(meta))
    print(f"wrote {args.out}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .pipeline import prepare_tokenizer
    from .sources import resolve_inputs

    opts = _build_options(args)
    opts.out.mkdir(parents=True, exist_ok=True)
    pieces = resolve_inputs(opts.inputs, opts.read, opts.piece_bytes, opts.default_code_bytes) \
        if opts.tokenizer == "bpe" else []
    info, cmap = prepare_tokenizer(opts, pieces)
    print(f"tokenizer {info.dir}: vocab {info.vocab_size}, EOD {info.eod_token!r} = {info.eod_token_id}, "
          f"pad id {info.pad_token_id}; compression V' = {cmap.compressed_vocab_size} "
          f"({cmap.reduction:.1%} reduction)")
    return 0


def cmd_sidecar(args: argparse.Namespace) -> int:
    from engram_pretrain.config import load_config

    from .sidecar import write_sidecar

    cfg = load_config(args.config, args.overrides)
    manifest = write_sidecar(args.dataset, cfg.model, chunk_tokens=args.chunk_tokens, progress=args.progress)
    e = manifest["engram"]
    print(f"wrote {Path(args.dataset) / 'engram_rows'}: layers {e['layers']}, {e['dtype']} rows, "
          f"{len(manifest['shards'])} shard(s)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from engram_pretrain.data.dataset_dir import DatasetDir

    from .pipeline import format_report

    ds = DatasetDir(args.dataset)
    print(format_report(ds.metadata))
    print(json.dumps({k: ds.metadata[k] for k in ("tokenizer_fingerprint", "compression_map_fingerprint",
                                                  "compressed_vocab_size", "versions", "created", "build")},
                     indent=2))
    shards = ds.split(args.split)
    if not shards:
        print(f"split {args.split!r} is empty")
        return 0
    tok = Tokenizer.from_file(str(ds.tokenizer_dir / "tokenizer.json"))
    doc = shards[0][args.doc % len(shards[0])]
    text = tok.decode(doc.tolist(), skip_special_tokens=False)
    print(f"--- {args.split} shard 0, document {args.doc % len(shards[0])}: {len(doc)} tokens "
          f"(first {args.chars} characters) ---")
    print(text[: args.chars])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="tokenize + shard a corpus into a dataset directory", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_corpus_args(b)
    b.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default min(8, cpus)); 0 runs in-process")
    b.add_argument("--valid-fraction", type=float, default=0.01, help="validation share of documents")
    b.add_argument("--split-seed", type=int, default=0, help="key of the document hash deciding the split")
    b.add_argument("--shard-tokens", type=_int, default=100_000_000,
                   help="close shards after this many tokens (at the next piece boundary; default 100M)")
    b.add_argument("--piece-bytes", type=_int, default=16 << 20,
                   help="unit of parallel work in uncompressed line files (default 16 MiB)")
    b.add_argument("--strict", action="store_true", help="fail on the first bad record, naming file and line")
    b.set_defaults(func=cmd_build)

    t = sub.add_parser("tokenizer", help="train a BPE or install an HF tokenizer into <out>/tokenizer")
    _add_corpus_args(t)
    t.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("sidecar", help="precompute Engram row ids of a dataset for a run config")
    s.add_argument("dataset", type=Path)
    s.add_argument("--config", required=True, help="run YAML (its model.engram section is used)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable)")
    s.add_argument("--chunk-tokens", type=_int, default=1 << 20)
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    s.set_defaults(func=cmd_sidecar)

    i = sub.add_parser("inspect", help="print metadata and a decoded sample document")
    i.add_argument("dataset", type=Path)
    i.add_argument("--split", default="train")
    i.add_argument("--doc", type=int, default=0, help="document index in the first shard")
    i.add_argument("--chars", type=int, default=600)
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 0) is None:
        del args.workers
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except DataError as err:
        print(f"error: bad input: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
