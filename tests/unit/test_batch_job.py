"""A job's output directory: fixed shards, parts trusted only by their footer, resume/overwrite rules,
manifest and _SUCCESS. No archive is loaded: parts are written from made-up rows."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from offline.job import (
    DEFAULT_SHARD_SIZE,
    MANIFEST,
    SUCCESS,
    JobError,
    default_shard_size,
    finish,
    plan_job,
    prepare_output,
)
from offline.output import TaskInfo
from offline.shards import remove_partial, run_shard, shard_done, temporary_parts, write_part
from offline.worker import RowResult


@pytest.fixture
def setup(tmp_path):
    archive = tmp_path / "model.mar"
    archive.write_bytes(b"pretend archive")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(10):
        (inputs / f"{i:02d}.jpg").write_bytes(b"x" * i)
    return archive, inputs, tmp_path / "out"


def rows_for(shard, bad=()):
    return [RowResult(ref.uri, 400, "invalid_input", "bad", '{"code":400}') if i in bad
            else RowResult(ref.uri, 200, None, None, '{"predictions":[]}') for i, ref in enumerate(shard.inputs)]


def write_all(job, shards):
    for shard in shards:
        write_part(job, shard, rows_for(shard, bad={0}), TaskInfo("image-classification"))


def test_fixed_shards_in_input_order(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4, batch_size=2)
    assert [len(s.inputs) for s in shards] == [4, 4, 2] and [s.index for s in shards] == [0, 1, 2]
    assert [r.uri for s in shards for r in s.inputs] == sorted(str(p) for p in inputs.iterdir())
    again, shards_again = plan_job(archive, inputs, out, shard_size=4, batch_size=8)
    assert shards_again == shards and again.identity() == job.identity()  # batch size is not identity
    limited, few = plan_job(archive, inputs, out, shard_size=4, limit=5)
    assert limited.rows == 5 and [len(s.inputs) for s in few] == [4, 1]


def test_finish_writes_counts_then_success(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4, config=["classifier.top_k=3"])
    prepare_output(job, shards)
    assert json.loads((out / MANIFEST).read_text())["state"] == "running"
    with pytest.raises(JobError, match="3 shard"):
        finish(job, shards)
    write_all(job, shards)
    total = finish(job, shards)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (out / SUCCESS).exists() and manifest["state"] == "complete"
    assert manifest["counts"] == {"rows": 10, "ok": 7, "errors": 3, "errors_by_type": {"invalid_input": 3}}
    assert manifest["job"]["archive_sha256"] == job.archive_sha256 and manifest["job"]["config"] == {
        "classifier.top_k": "3"}
    assert [s["part"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert total.rows == 10 and total.errors == {"invalid_input": 3}


def test_existing_output_needs_resume_or_overwrite(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4)
    prepare_output(job, shards)
    write_all(job, shards)
    with pytest.raises(JobError, match="--resume to continue it or --overwrite"):
        prepare_output(job, shards)
    prepare_output(job, shards, resume=True)
    assert all(shard_done(job, s) for s in shards)
    (out / "mine.txt").write_text("a user's file")
    prepare_output(job, shards, overwrite=True)
    assert not any(shard_done(job, s) for s in shards)
    assert (out / "mine.txt").exists()  # --overwrite removes only what a batch job writes


@pytest.mark.parametrize("change, named", [
    ("archive", "the archive changed"), ("config", "--config changed"), ("inputs", "the inputs changed"),
    ("shard_size", "--shard-size changed")])
def test_resume_refuses_another_jobs_output_naming_the_difference(setup, change, named):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4)
    prepare_output(job, shards)
    write_all(job, shards[:1])
    kwargs: dict = {"shard_size": 4}
    if change == "archive":
        archive.write_bytes(b"a retrained model")
    elif change == "config":
        kwargs["config"] = ["classifier.top_k=1"]
    elif change == "inputs":
        (inputs / "new.jpg").write_bytes(b"new")
    else:
        kwargs["shard_size"] = 5
    other, other_shards = plan_job(archive, inputs, out, **kwargs)
    with pytest.raises(JobError, match=named):
        prepare_output(other, other_shards, resume=True)


def test_a_part_counts_only_when_its_footer_matches(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4)
    prepare_output(job, shards)
    write_all(job, shards)
    part = job.part_path(1)
    assert shard_done(job, shards[1])
    # another job's part (different config) in the same place is not done for this job
    other = dataclasses.replace(job, config={"classifier.top_k": "1"})
    assert not shard_done(other, shards[1])
    # a part that holds another shard's rows is not done
    assert not shard_done(job, dataclasses.replace(shards[1], index=0))
    # a truncated part (as a copy cut short would leave) is not done
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    assert not shard_done(job, shards[1])
    part.unlink()
    assert not shard_done(job, shards[1])
    # leftovers of a killed writer are neither parts nor a problem
    (out / ".part-00001.parquet.123.abcd.tmp").write_bytes(b"half")
    assert not shard_done(job, shards[1])
    prepare_output(job, shards, overwrite=True)
    assert not (out / ".part-00001.parquet.123.abcd.tmp").exists()


def test_write_part_refuses_rows_that_do_not_match_the_shard(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4)
    rows = rows_for(shards[0])
    with pytest.raises(RuntimeError, match="out of order"):
        write_part(job, shards[0], rows[::-1], TaskInfo())
    assert not job.part_path(0).exists()


def test_default_shard_size_gives_every_worker_several_shards(setup):
    # one worker: nothing to balance, 1024 rows a part as before
    assert default_shard_size(10, 1, 8) == DEFAULT_SHARD_SIZE
    # several: ~SHARDS_PER_WORKER shards each, whole batches, at least one batch, at most 1024 rows
    assert default_shard_size(1000, 2, 8) == 128  # ceil(1000 / 8) = 125 -> 16 batches of 8
    assert default_shard_size(5, 2, 8) == 8
    assert default_shard_size(10_000_000, 4, 8) == DEFAULT_SHARD_SIZE
    assert default_shard_size(10_000_000, 4, 3) == 1023
    assert default_shard_size(10_000_000, 4, 2048) == 2048
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, workers=2, batch_size=1)
    assert job.shard_size == 2 and len(shards) == 5 >= 2 * 2
    assert [ref.uri for s in shards for ref in s.inputs] == sorted(str(p) for p in inputs.iterdir())


def test_resume_keeps_the_recorded_shard_size_whatever_workers_says_now(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, workers=2, batch_size=1)
    prepare_output(job, shards)
    write_all(job, shards[:3])  # killed after three parts
    assert json.loads((out / MANIFEST).read_text())["job"]["shard_size"] == 2
    # resumed with other --workers: the default would now be 1, the recorded 2 is used instead
    assert default_shard_size(10, 3, 1) == 1
    again, shards_again = plan_job(archive, inputs, out, workers=3, batch_size=1, resume=True)
    assert again.shard_size == 2 and shards_again == shards
    prepare_output(again, shards_again, resume=True)
    assert [shard_done(again, s) for s in shards_again] == [True, True, True, False, False]
    # an explicit --shard-size still wins (and a different one is refused, naming it)
    other, other_shards = plan_job(archive, inputs, out, workers=3, batch_size=1, shard_size=3, resume=True)
    with pytest.raises(JobError, match="--shard-size changed"):
        prepare_output(other, other_shards, resume=True)
    # without --resume the recorded size is not consulted
    fresh, _ = plan_job(archive, inputs, out, workers=3, batch_size=1)
    assert fresh.shard_size == 1


class ReadAheadWorker:
    """run_shard's side of ArchiveWorker, recording when batches are read and run."""

    def __init__(self):
        self.events = []
        self.second_read = threading.Event()
        self.read_threads = set()

    def prepare(self, rows):
        self.read_threads.add(threading.get_ident())
        self.events.append(("read", rows[0].uri))
        if len(self.events) > 1:
            self.second_read.set()
        return rows

    def run_prepared(self, rows):
        # the next batch is read while this one runs: wait for it (a worker without read-ahead
        # would read it only after this returns, and the assertion below would fail)
        if rows[0].uri == self.first:
            self.overlapped = self.second_read.wait(timeout=10)
        self.events.append(("run", rows[0].uri))
        return rows_for(type("S", (), {"inputs": rows})())

    def task_info(self):
        return TaskInfo("image-classification")


def test_run_shard_reads_the_next_batch_ahead_and_removes_a_killed_writers_leftover(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=10, batch_size=4)
    prepare_output(job, shards)
    leftover = out / ".part-00000.parquet.4242.deadbeef.tmp"  # a worker killed mid-write
    leftover.write_bytes(b"half a parquet file")
    worker = ReadAheadWorker()
    worker.first = shards[0].inputs[0].uri
    outcome = run_shard(job, shards[0], worker)
    assert worker.overlapped, worker.events
    uris = [ref.uri for ref in shards[0].inputs]
    assert worker.events[:2] == [("read", uris[0]), ("read", uris[4])]
    assert [e for e in worker.events if e[0] == "run"] == [("run", uris[0]), ("run", uris[4]), ("run", uris[8])]
    assert threading.get_ident() not in worker.read_threads
    assert outcome.rows == 10 and shard_done(job, shards[0])
    assert not leftover.exists() and not temporary_parts(job, shards[0])
    import pyarrow.parquet as pq

    assert pq.read_table(job.part_path(0)).column("uri").to_pylist() == uris


def test_remove_partial_touches_only_that_shards_temporary_parts(setup):
    archive, inputs, out = setup
    job, shards = plan_job(archive, inputs, out, shard_size=4)
    prepare_output(job, shards)
    write_all(job, shards)
    mine = out / ".part-00001.parquet.1.aa.tmp"
    theirs = out / ".part-00002.parquet.1.bb.tmp"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"x")
    remove_partial(job, shards[1])
    assert not mine.exists() and theirs.exists()
    assert all(shard_done(job, s) for s in shards)
