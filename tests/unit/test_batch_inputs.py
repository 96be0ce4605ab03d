"""`tsgpu batch --input`: what each kind of input becomes, in which order, and the fingerprint."""

from __future__ import annotations

import json
import os

import pytest

from offline.inputs import fingerprint, read_inputs
from offline.job import InputRef, JobError


def _tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def test_directory_is_recursive_sorted_and_skips_hidden(tmp_path):
    _tree(tmp_path, ["b.jpg", "a/z.png", "a/b/c.gif", "A.txt", ".hidden", ".git/x", "a/.DS_Store", "noext"])
    refs = read_inputs(tmp_path)
    rel = [os.path.relpath(r.uri, tmp_path) for r in refs]
    assert rel == ["A.txt", "a/b/c.gif", "a/z.png", "b.jpg", "noext"]  # byte order of relative paths
    assert all(r.kind == "file" and r.value is None and os.path.isabs(r.uri) for r in refs)


def test_list_file_paths_relative_to_the_list_urls_and_comments(tmp_path):
    _tree(tmp_path, ["imgs/one.jpg"])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my inputs\nimgs/one.jpg\n\n  https://example.invalid/x.jpg  \n{tmp_path}/imgs/two.jpg\n")
    refs = read_inputs(listing)
    assert refs == [InputRef(str(tmp_path / "imgs/one.jpg"), "file"),
                    InputRef("https://example.invalid/x.jpg", "url", "https://example.invalid/x.jpg"),
                    InputRef(str(tmp_path / "imgs/two.jpg"), "file")]


def test_csv_parquet_jsonl_with_a_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in.csv").write_text("id,path\n1,a.jpg\n2,http://h.invalid/b.jpg\n")
    pq.write_table(pa.table({"path": ["a.jpg", "http://h.invalid/b.jpg"]}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text('{"path": "a.jpg"}\n\n{"path": "http://h.invalid/b.jpg"}\n')
    want = [InputRef(str(tmp_path / "a.jpg"), "file"), InputRef("http://h.invalid/b.jpg", "url", "http://h.invalid/b.jpg")]
    for name in ("in.csv", "in.parquet", "in.jsonl"):
        assert read_inputs(tmp_path / name, column="path") == want, name


def test_jsonl_without_column_sends_each_record_as_written(tmp_path):
    lines = ['{"data": "abc"}', '{"url": "http://h.invalid/x.jpg"}', '{"broken": ']
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    refs = read_inputs(tmp_path / "r.jsonl")
    assert [r.kind for r in refs] == ["json"] * 3
    assert [r.value for r in refs] == lines  # byte for byte, even the broken one (the handler answers it)
    assert refs[2].uri == f"{tmp_path / 'r.jsonl'}#3"


def test_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "in.csv").write_text("id,path\n1,a.jpg\n")
    with pytest.raises(JobError, match=r"needs --column"):
        read_inputs(tmp_path / "in.csv")
    with pytest.raises(JobError, match=r"no such column \(columns: id, path\)"):
        read_inputs(tmp_path / "in.csv", column="file")
    with pytest.raises(JobError, match="no such file or directory"):
        read_inputs(tmp_path / "missing")
    with pytest.raises(JobError, match="only for CSV/JSONL/Parquet"):
        read_inputs(tmp_path, column="path")


def test_fingerprint_changes_when_inputs_change_and_only_then(tmp_path):
    _tree(tmp_path, ["a.jpg", "b.jpg"])
    base = fingerprint(read_inputs(tmp_path))
    assert fingerprint(read_inputs(tmp_path)) == base
    (tmp_path / "a.jpg").write_bytes(b"different length")
    changed = fingerprint(read_inputs(tmp_path))
    assert changed != base
    st = os.stat(tmp_path / "b.jpg")
    os.utime(tmp_path / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # rewritten, same size
    assert fingerprint(read_inputs(tmp_path)) != changed
    current = fingerprint(read_inputs(tmp_path))
    (tmp_path / "c.jpg").write_bytes(b"c")
    assert fingerprint(read_inputs(tmp_path)) != current
    refs = read_inputs(tmp_path)
    assert fingerprint(refs[::-1]) != fingerprint(refs)  # order is part of it
    assert fingerprint([InputRef("x#1", "json", json.dumps({"a": 1}))]) != fingerprint([InputRef("x#1", "json", "{}")])
