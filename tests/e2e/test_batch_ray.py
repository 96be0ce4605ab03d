"""`tsgpu batch --engine ray` on a multi-node Ray cluster started by the test, on this one machine.

The cluster (`ray.cluster_utils.Cluster`): a head and one more node, 2 CPUs and 1 logical GPU each,
so `--gpus-per-worker 0.5` schedules two actors per node on a CPU-only host. One cluster for the
module (Ray takes seconds to start). The archive is the red-box detector (tests/detection_models.py,
exported at 160x160); the corpus mixes good JPEGs/PNGs (EXIF-rotated too) with bad inputs (corrupt,
text, GIF, CMYK, over max_request_size).

What is held: the Ray engine's part files give, for every input, the same `status` and the
byte-identical `response` as the local engine (`offline/engines/local.py`, an in-process worker per
process), which tests/e2e/test_batch_sameness.py holds to a real torchserve; and a worker process
killed in the middle of the job costs nothing: the job completes with every input exactly once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from offline.engines import local
from offline.engines import ray as ray_engine
from offline.job import JobError, finish, plan_job, prepare_output
from tests import detection_models, segmentation_models
from tests.helpers import DETECTOR_LABELS, encode_case

NODES = 2
CPUS_PER_NODE = 2
GPUS_PER_NODE = 1  # logical: nothing uses them, Ray only schedules by them


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("ray-build")
    labels = build / "labels.json"
    labels.write_text(json.dumps(DETECTOR_LABELS))
    model = segmentation_models.save_exported(detection_models.RedBoxYolo(), build / "det.pt2", (160, 160))
    return build_archive("detect", model, build / "store", task="object-detection", labels=labels, batch_size=4,
                         config=["preprocess.input_size=[160,160]"], log=lambda message: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """28 inputs: good images of several sizes and orientations, and bad ones."""
    root = tmp_path_factory.mktemp("ray-corpus")
    for i in range(20):
        width, height = 200 + 24 * i, 150 + 10 * (i % 5)
        orientation = (1, 6, 8)[i % 3]
        upright = (width, height) if orientation == 1 else (height, width)
        box = (20, 30, 20 + upright[0] // 3, 30 + upright[1] // 3)
        (root / f"good_{i:02d}.jpg").write_bytes(encode_case(*upright, box, orientation))
    (root / "png.png").write_bytes(samples.encode(samples.photos()["coffee"][:200, :300], "PNG"))
    (root / "gif.gif").write_bytes(samples.encode(samples.photos()["coffee"][:100, :100], "GIF"))
    cmyk = io.BytesIO()
    Image.fromarray(samples.photos()["coffee"][:120, :160]).convert("CMYK").save(cmyk, "JPEG")
    (root / "cmyk.jpg").write_bytes(cmyk.getvalue())
    good = (root / "good_00.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "text.txt").write_bytes(b"this is not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "nested").mkdir()
    (root / "nested" / "deep.jpg").write_bytes(good)
    (root / "too_large.jpg").write_bytes(np.random.default_rng(0).bytes(6_553_501))  # over max_request_size
    return root


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a Ray left connected by another test would be used instead of this cluster
        ray.shutdown()
    started = time.monotonic()
    head = {"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(NODES - 1):
        c.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
    c.wait_for_nodes()
    print(f"\nRay cluster of {NODES} nodes up in {time.monotonic() - started:.1f} s")
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def local_rows(archive, corpus, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """The local engine's answers: uri -> (status, response)."""
    out = tmp_path_factory.mktemp("local") / "out"
    job, shards = plan_job(archive, corpus, out, batch_size=4, shard_size=5)
    prepare_output(job, shards)
    local.run(job, shards, workers=1)
    finish(job, shards)
    return by_uri(out)


def by_uri(out: Path) -> dict[str, tuple[int, str]]:
    """uri -> (status, response) over every part; fails on an input seen twice."""
    rows: dict[str, tuple[int, str]] = {}
    for part in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["uri", "status", "response"]).to_pylist()
        for row in table:
            assert row["uri"] not in rows, f"{row['uri']} is in the output twice"
            rows[row["uri"]] = (row["status"], row["response"])
    return rows


def ray_job(archive, corpus, out: Path, shard_size: int, batch_size: int = 4):
    job, shards = plan_job(archive, corpus, out, batch_size=batch_size, shard_size=shard_size)
    prepare_output(job, shards)
    return job, shards


def our_raylets(cluster) -> set[int]:
    return {proc.process.pid for node in cluster.list_all_nodes()
            for proc in node.all_processes.get("raylet", [])}


def shard_runner_pids(cluster) -> list[int]:
    """Pids of this cluster's ShardRunner actors: children of its raylets named ray::ShardRunner."""
    raylets = our_raylets(cluster)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid in raylets and cmdline.startswith("ray::ShardRunner"):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_ray_engine_on_two_nodes_answers_as_the_local_engine(archive, corpus, cluster, local_rows, tmp_path, caplog):
    started = time.monotonic()
    out = tmp_path / "out"
    job, shards = ray_job(archive, corpus, out, shard_size=5)
    shown = []
    with caplog.at_level(logging.INFO, logger="offline.engines.ray"):
        summary = ray_engine.run(job, shards, workers=3, gpus_per_worker=0.5, address=cluster.address,
                                 progress=lambda rows, errors: shown.append((rows, errors)))
    total = finish(job, shards, [summary])
    print(f"\nray engine, {len(local_rows)} inputs, 3 workers on {NODES} nodes: {time.monotonic() - started:.1f} s")

    assert "on 2 node(s)" in caplog.text  # SPREAD put actors on both nodes
    assert (out / "_SUCCESS").exists() and total.rows == len(local_rows) == 28
    assert summary.shards_written == len(shards) and summary.shards_skipped == 0
    assert sum(r for r, _ in shown) == len(local_rows)  # progress saw every row once
    assert sum(e for _, e in shown) == total.error_rows
    ray_rows = by_uri(out)
    assert ray_rows.keys() == local_rows.keys()
    different = [uri for uri in local_rows if ray_rows[uri] != local_rows[uri]]
    assert not different, (different[:3], [(ray_rows[u], local_rows[u]) for u in different[:1]])
    statuses = sorted({status for status, _ in ray_rows.values()})
    assert statuses == [200, 400, 413, 415], statuses  # the corpus reaches the error paths it is meant to
    drawn = [json.loads(body) for uri, (status, body) in ray_rows.items() if "good_" in uri or "deep" in uri]
    assert len(drawn) == 21 and all([d["label"] for d in b["detections"]] == ["red_box"] for b in drawn)

    # --resume over the complete output: nothing to do, nothing started
    summary = ray_engine.run(job, shards, workers=3, gpus_per_worker=0.5, address=cluster.address)
    assert (summary.shards_skipped, summary.shards_written) == (len(shards), 0)


@pytest.mark.slow
def test_a_worker_killed_mid_job_costs_nothing(archive, corpus, cluster, local_rows, tmp_path, caplog):
    started = time.monotonic()
    out = tmp_path / "out"
    # 7 shards of 4 one-input batches for 2 workers: progress (and so the kill) comes mid-shard
    job, shards = ray_job(archive, corpus, out, shard_size=4, batch_size=1)
    killed: list[int] = []
    lock = threading.Lock()

    def kill_one_worker(rows: int, errors: int) -> None:
        with lock:
            if killed:
                return
            pids = shard_runner_pids(cluster)
            assert pids, "no ShardRunner process found under this cluster's raylets"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    with caplog.at_level(logging.WARNING, logger="offline.engines.ray"):
        summary = ray_engine.run(job, shards, workers=2, gpus_per_worker=0.5, address=cluster.address,
                                 progress=kill_one_worker)
    total = finish(job, shards, [summary])
    print(f"\nray engine with a worker killed: {time.monotonic() - started:.1f} s")

    assert killed and "a Ray worker died running shard" in caplog.text
    assert (out / "_SUCCESS").exists() and total.rows == len(local_rows)
    ray_rows = by_uri(out)  # every input exactly once ...
    assert ray_rows == local_rows  # ... with the same answers
    assert not list(out.glob(".part-*"))  # no temporary part left behind by the finished shards


@pytest.mark.slow
def test_max_error_rate_stops_the_job_and_resume_completes_it(archive, corpus, cluster, local_rows, tmp_path):
    """--max-error-rate (Progress raises ErrorRateExceeded): run() raises after the actors stopped;
    the parts written are valid, and --resume (on the Ray engine) completes the same output."""
    from offline.progress import ErrorRateExceeded, Progress
    from offline.shards import shard_done

    out = tmp_path / "out"
    job, shards = ray_job(archive, corpus, out, shard_size=4, batch_size=1)
    progress = Progress(job.rows, max_error_rate=0.0, min_rows=1, stream=io.StringIO(), tty=False)
    with pytest.raises(ErrorRateExceeded):
        ray_engine.run(job, shards, workers=1, gpus_per_worker=0.5, address=cluster.address, progress=progress)
    done = [s.index for s in shards if shard_done(job, s)]
    assert len(done) < len(shards)  # stopped before the end ...
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in done]
    assert not list(out.glob(".part-*"))  # ... with no half part

    summary = ray_engine.run(job, shards, workers=2, gpus_per_worker=0.5, address=cluster.address)
    assert summary.shards_skipped == len(done) and summary.shards_written == len(shards) - len(done)
    finish(job, shards, [summary])
    assert by_uri(out) == local_rows


def test_a_dead_workers_temporary_part_is_removed_before_its_shard_reruns(tmp_path):
    """A worker SIGKILLed inside write_part leaves `.part-NNNNN.parquet.<pid>.<id>.tmp` (its own cleanup
    never runs; the kill test above hits this when the kill lands mid-write): the engine deletes that
    shard's temporaries, and only those, before the rerun."""
    from offline.job import JobSpec, Shard
    from offline.shards import remove_partial

    job = JobSpec(archive="a.mar", archive_sha256="0" * 64, config={}, input_fingerprint="f", output=str(tmp_path),
                  batch_size=1, shard_size=1)
    names = [".part-00001.parquet.123.abcd1234.tmp", ".part-00012.parquet.9.ffff0000.tmp", "part-00001.parquet",
             ".part-00002.parquet.5.00000000.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    remove_partial(job, Shard(1, ()))  # what the engine calls before it reruns a dead worker's shard
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_gpus_the_cluster_lacks_are_refused_and_workers_capped_to_what_fits():
    with pytest.raises(JobError, match=r"--gpus-per-worker 1: the Ray cluster has 0 GPU"):
        ray_engine.actors_that_fit(2, 1, 1, {"CPU": 8.0})
    assert ray_engine.actors_that_fit(5, 0.5, 1, {"CPU": 8.0, "GPU": 2.0}) == 4  # two per GPU
    assert ray_engine.actors_that_fit(5, 0.0, 1, {"CPU": 3.0}) == 3
    assert ray_engine.actors_that_fit(2, 0.25, 0.5, {"CPU": 8.0, "GPU": 1.0}) == 2


def test_without_ray_the_engine_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(JobError, match=r"pip install 'torchserve-gpu-handlers\[ray\]'"):
        ray_engine.import_ray()
