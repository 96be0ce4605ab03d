"""`tsgpu batch` as a user runs it: the whole command, its output directory, resume after a kill,
the error-rate guard and what it prints. The local engine's worker processes are real."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (the [batch] extra)")

from archiver_scripts import samples
from archiver_scripts.cli import main as tsgpu
from offline.progress import ErrorRateExceeded, Progress
from tests import models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_mar(tmp_path_factory):
    build, store = tmp_path_factory.mktemp("cli-build"), tmp_path_factory.mktemp("cli-store")
    return models.build_tiny_archive("tiny", store, build, batch_size=4, config=["classifier.top_k=2"])


@pytest.fixture(autouse=True)
def archive_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSGPU_ARCHIVE_CACHE", str(tmp_path / "cache"))


def _images(root: Path, count: int, bad_every: int = 0) -> Path:
    """`count` small distinct JPEGs (every `bad_every`-th one a text file) under root/a, root/b."""
    rng = np.random.default_rng(1)
    for i in range(count):
        path = root / ("a" if i % 2 else "b") / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if bad_every and i % bad_every == 0:
            path.write_bytes(b"not an image %d" % i)
        else:
            path.write_bytes(samples.encode(rng.integers(0, 255, (24 + i % 7, 32, 3), dtype=np.uint8), "JPEG"))
    return root


def _rows(out: Path) -> list[dict]:
    table = pq.read_table(out)  # the directory: pyarrow skips _manifest.json, _SUCCESS and .tmp files
    return sorted(table.select(["uri", "status", "error_type", "response", "predictions"]).to_pylist(),
                  key=lambda r: r["uri"])


@pytest.mark.slow
def test_a_directory_into_parquet_readable_by_pandas(tiny_mar, tmp_path, capsys):
    inputs = _images(tmp_path / "in", 12, bad_every=5)
    out = tmp_path / "out"
    assert tsgpu(["batch", str(tiny_mar), "--input", str(inputs), "--output", str(out), "--workers", "2",
                  "--shard-size", "5", "--batch-size", "3", "--progress", "lines"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "_manifest.json", "part-00000.parquet",
                                                    "part-00001.parquet", "part-00002.parquet"]
    df = pq.read_table(out).to_pandas()
    assert len(df) == 12 and df.uri.is_unique and (df.status == 200).sum() == 9
    assert (df[df.status != 200].error_type == "unsupported_media_type").all()
    assert df[df.status == 200].predictions.map(len).eq(2).all()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"] == {"rows": 12, "ok": 9, "errors": 3, "errors_by_type": {"unsupported_media_type": 3}}
    err = capsys.readouterr().err
    assert "tsgpu batch: 12/12 rows (100%)" in err and "12 rows in" in err and "unsupported_media_type" in err
    # a second run into the same directory needs a decision
    assert tsgpu(["batch", str(tiny_mar), "--input", str(inputs), "--output", str(out)]) == 2
    assert "--resume to continue it or --overwrite" in capsys.readouterr().err
    # --resume with another config is refused, naming it
    assert tsgpu(["batch", str(tiny_mar), "--input", str(inputs), "--output", str(out), "--shard-size", "5",
                  "--resume", "--config", "classifier.top_k=1"]) == 2
    assert "--config changed" in capsys.readouterr().err
    # --resume of a complete job does nothing and succeeds again
    assert tsgpu(["batch", str(tiny_mar), "--input", str(inputs), "--output", str(out), "--shard-size", "5",
                  "--resume", "--progress", "none"]) == 0
    assert "0 rows this run" in capsys.readouterr().err and (out / "_SUCCESS").exists()


@pytest.mark.slow
def test_max_error_rate_stops_with_a_clear_message(tiny_mar, tmp_path, capsys):
    inputs = _images(tmp_path / "in", 60, bad_every=2)
    out = tmp_path / "out"
    code = tsgpu(["batch", str(tiny_mar), "--input", str(inputs), "--output", str(out), "--shard-size", "4",
                  "--batch-size", "4", "--max-error-rate", "0.2", "--progress", "none"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--max-error-rate 0.2 exceeded" in err and "were errors; stopped" in err
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / "_manifest.json").read_text())["state"] == "stopped"


def test_progress_bar_lines_and_error_rate_guard():
    stream = io.StringIO()
    bar = Progress(total=100, already=20, stream=stream, tty=True, max_error_rate=0.5, min_rows=10)
    bar(8, 5)  # 5 of 8 are errors, but fewer than min_rows rows: not judged yet
    assert stream.getvalue().startswith("\r[#####...............]  28/100  28%") and "errors 5" in stream.getvalue()
    assert "rows/s" in stream.getvalue() and "ETA" in stream.getvalue()
    with pytest.raises(ErrorRateExceeded, match=r"7 of 10 rows \(70.0%\)"):
        bar(2, 2)
    lines = io.StringIO()
    plain = Progress(total=10, stream=lines, tty=False, interval=0)
    plain(4, 0)
    plain(6, 1)
    plain.close()
    first, second = lines.getvalue().splitlines()[:2]
    assert first.startswith("tsgpu batch: 4/10 rows (40%), ") and second.startswith("tsgpu batch: 10/10 rows (100%), ")
    assert second.endswith(", 1 errors") and "\r" not in lines.getvalue()


@pytest.mark.slow
def test_default_shard_size_spreads_a_small_job_and_resume_keeps_it(tiny_mar, tmp_path, capsys):
    """Under 1024 inputs and 2 workers: several shards (not one shard on one worker); --resume with
    another --workers keeps the shard size recorded in the manifest."""
    inputs = _images(tmp_path / "in", 16)
    out = tmp_path / "out"
    args = [str(tiny_mar), "--input", str(inputs), "--output", str(out), "--batch-size", "2", "--progress", "none"]
    assert tsgpu(["batch", *args, "--workers", "2"]) == 0
    assert "16 inputs in 8 shard(s) of 2" in capsys.readouterr().err  # 4 shards per worker, whole batches
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 8 and json.loads((out / "_manifest.json").read_text())["job"]["shard_size"] == 2
    reference = _rows(out)
    for part in parts[5:]:  # as if killed after five parts
        part.unlink()
    (out / "_SUCCESS").unlink()
    (out / ".part-00006.parquet.77.dead.tmp").write_bytes(b"half")  # a writer killed mid-write
    assert tsgpu(["batch", *args, "--workers", "1", "--resume"]) == 0  # 1 worker alone would default to 1024
    err = capsys.readouterr().err
    assert "16 inputs in 8 shard(s) of 2" in err and "10 rows already done" in err
    assert _rows(out) == reference and (out / "_SUCCESS").exists()
    assert not list(out.glob(".part-*.tmp"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_mar, tmp_path):
    """SIGKILL at a random moment after some parts exist, then --resume: every input exactly once and
    the same rows as an uninterrupted run."""
    inputs = _images(tmp_path / "in", 150, bad_every=11)
    args = [str(tiny_mar), "--input", str(inputs), "--shard-size", "6", "--batch-size", "2", "--progress", "lines"]
    reference = tmp_path / "reference"
    assert tsgpu(["batch", *args, "--output", str(reference)]) == 0

    out = tmp_path / "out"
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    proc = subprocess.Popen([sys.executable, "-m", "archiver_scripts.cli", "batch", *args, "--output", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wanted_parts = rng.randint(2, 12)
    deadline = time.monotonic() + 180
    while len(list(out.glob("part-*.parquet"))) < wanted_parts and proc.poll() is None:
        assert time.monotonic() < deadline, "no parts appeared"
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))  # somewhere inside a shard, or between two
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, (seed, stderr[-2000:])
    written = len(list(out.glob("part-*.parquet")))
    assert not (out / "_SUCCESS").exists() and written < 25, f"seed {seed}: the run finished before the kill"

    assert tsgpu(["batch", *args, "--output", str(out), "--resume"]) == 0
    rows = _rows(out)
    assert [r["uri"] for r in rows] == sorted(str(p) for p in inputs.rglob("*.jpg")), seed  # each exactly once
    assert rows == _rows(reference), seed
    assert not list(out.glob(".part-*.tmp")), seed  # a part killed mid-write leaves no temporary file behind
    assert json.loads((out / "_manifest.json").read_text())["counts"] == \
        json.loads((reference / "_manifest.json").read_text())["counts"]


@pytest.mark.slow
def test_an_archive_that_fails_to_load_stops_the_job_naming_the_error(tiny_mar, tmp_path, capsys):
    inputs = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert tsgpu(["batch", str(tiny_mar), "--input", str(inputs), "--output", str(out), "--progress", "none",
                  "--config", "classifier.top_kk=1"]) == 1
    err = capsys.readouterr().err
    assert "loading" in err and "top_kk" in err
    assert not (out / "_SUCCESS").exists() and json.loads((out / "_manifest.json").read_text())["state"] == "failed"
