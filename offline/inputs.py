"""What `--input` names -> the job's inputs, in one deterministic order, and their fingerprint.

    directory     every regular file below it (recursive; names starting with "." skipped), sorted by
                  relative path (POSIX, byte order); whatever the extension, each file is one input
    .csv          --column C: each row's C is a path or URL
    .jsonl/.ndjson  without --column: each record is sent as its JSON (application/json);
                  with --column C: the record's C is a path or URL (an object in C is sent as JSON)
    .parquet      --column C: each row's C is a path or URL
    anything else a list file: one path or URL per line (blank lines and lines starting with # skipped)

Relative paths in a list, CSV, JSONL or Parquet file are relative to that file's directory, so a
list travels with the files it names. Paths become absolute; a URL is anything with a scheme
(`http://`, `https://`, `s3://`...), sent as `{"url": ...}` for the handler to fetch.

The fingerprint (`fingerprint`) is a sha256 over every input's uri and kind, the JSON text or URL,
and for files their size and mtime in nanoseconds. It changes whenever an input is added, removed,
reordered, resized or rewritten, without reading every file's bytes (a content hash would read a
terabyte corpus twice). A `touch` without a change also changes it: --resume then refuses, which is
the safe direction; a file rewritten to the same size within the same nanosecond is not detected.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .job import InputRef, JobError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def read_inputs(source: str | Path, column: str | None = None) -> list[InputRef]:
    """The inputs `--input source [--column column]` names, in their fixed order."""
    path = Path(source)
    if path.is_dir():
        if column:
            raise JobError(f"--column {column}: only for CSV/JSONL/Parquet inputs; {source} is a directory")
        return _directory(path)
    if not path.is_file():
        raise JobError(f"--input {source}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv(path, _need_column(column, path))
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(path, column)
    if suffix == ".parquet":
        return _parquet(path, _need_column(column, path))
    if column:
        raise JobError(f"--column {column}: only for CSV/JSONL/Parquet inputs; {source} is read as a list of "
                       f"paths/URLs (one per line)")
    return _list_file(path)


def _need_column(column: str | None, path: Path) -> str:
    if not column:
        raise JobError(f"--input {path}: a {path.suffix} input needs --column NAME (the column holding paths or URLs)")
    return column


def _directory(root: Path) -> list[InputRef]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            full = Path(dirpath) / name
            if name.startswith(".") or not full.is_file():
                continue
            found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0].encode("utf-8", "surrogateescape"))
    return [InputRef(os.path.abspath(full), "file") for _, full in found]


def _ref(text: str, base: Path, where: str) -> InputRef:
    text = text.strip()
    if not text:
        raise JobError(f"{where}: empty path")
    if is_url(text):
        return InputRef(text, "url", text)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = base / path
    return InputRef(os.path.abspath(path), "file")  # absolute, symlinks kept: the names the user sees


def _list_file(path: Path) -> list[InputRef]:
    base = Path(os.path.abspath(path)).parent
    refs = []
    with open(path, encoding="utf-8") as f:
        for text in f:
            text = text.strip()
            if text and not text.startswith("#"):
                refs.append(_ref(text, base, str(path)))
    return refs


def _cell_ref(value: Any, path: Path, line: int, column: str) -> InputRef:
    uri = f"{os.path.abspath(path)}#{line}"
    if isinstance(value, dict):
        return InputRef(uri, "json", json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    if not isinstance(value, str) or not value.strip():
        raise JobError(f"{path} row {line}: column {column!r} must hold a path or URL, got {value!r}")
    return _ref(value, Path(os.path.abspath(path)).parent, f"{path} row {line}")


def _csv(path: Path, column: str) -> list[InputRef]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise JobError(f"--column {column}: {path} has no such column (columns: {', '.join(reader.fieldnames or [])})")
        return [_cell_ref(row[column], path, line, column) for line, row in enumerate(reader, start=1)]


def _jsonl(path: Path, column: str | None) -> list[InputRef]:
    refs = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            text = raw.rstrip("\r\n")  # the record byte for byte, but for its line ending
            if not text.strip():
                continue
            uri = f"{os.path.abspath(path)}#{line}"
            if column is None:
                # The record as its JSON, byte for byte as written (a bad record becomes the server's
                # answer to a bad JSON body, at run time).
                refs.append(InputRef(uri, "json", text))
                continue
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise JobError(f"{path} line {line}: not JSON ({exc}); with --column every line must be a record") from None
            if not isinstance(record, dict) or column not in record:
                raise JobError(f"{path} line {line}: no key {column!r} (--column)")
            refs.append(_cell_ref(record[column], path, line, column))
    return refs


def _parquet(path: Path, column: str) -> list[InputRef]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if column not in schema.names:
        raise JobError(f"--column {column}: {path} has no such column (columns: {', '.join(schema.names)})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [_cell_ref(v, path, line, column) for line, v in enumerate(values, start=1)]


def fingerprint(refs: list[InputRef]) -> str:
    """sha256 over the inputs in order: uri, kind, value, and size + mtime_ns of files."""
    digest = hashlib.sha256()
    digest.update(f"{len(refs)}\n".encode())
    for ref in refs:
        stamp = ""
        if ref.kind == "file":
            try:
                st = os.stat(ref.uri)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError as exc:
                stamp = f"unreadable:{type(exc).__name__}"
        digest.update(json.dumps([ref.uri, ref.kind, ref.value, stamp]).encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()
