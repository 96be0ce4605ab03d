"""`tsgpu profile` end to end on a tiny archive: the archive is loaded in-process like a worker, the
printed table and the JSON have the documented structure, and the host's `handlers` survive it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import handlers
from archiver_scripts import samples
from archiver_scripts.cli import main
from archiver_scripts.profile import (
    NOT_AVAILABLE, OTHER, Advice, Profile, ProfileError, Run, format_profile, parse_batch_sizes,
)
from handlers.stages import STAGES
from tests import models

RECOMMENDATIONS = {"batchSize", "micro_batch", "decode_processes", "workers", "preprocess_backend"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    mar = models.build_tiny_archive("tiny", d, d, batch_size=2)
    images = d / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.jpg").write_bytes(samples.encode(samples.mosaic(160 + 40 * i, 120)))
    (images / "notes.txt").write_bytes(b"not an image")  # one bad item: counted, never fatal
    return mar, images


@pytest.fixture(scope="module")
def json_run(archive):
    mar, images = archive
    threads = torch.get_num_threads()
    host_handlers = sys.modules["handlers"]
    out = _run(["profile", str(mar), "--images", str(images), "--batch-sizes", "1,2", "--seconds", "0.05", "--json"])
    assert sys.modules["handlers"] is host_handlers  # the archive's copy was set aside again
    assert torch.get_num_threads() == threads  # the worker's thread sizing did not leak
    return out


def _run(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0
    return buf.getvalue()


def test_json_structure(json_run, archive):
    result = json.loads(json_run)
    assert result["model"] == "tiny" and result["device"] == "cpu" and result["images"] == 4
    assert result["handler"]["preprocess_backend"] == "cpu"
    assert result["handler"]["archive_batch_size"] == 2
    assert [r["batch_size"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert set(run["ms_per_image"]) == {*STAGES, OTHER}
        assert run["ms_per_image"]["DecodeTime"] > 0 and run["ms_per_image"]["ForwardTime"] > 0
        assert run["ms_per_image"]["FetchTime"] == 0  # no URL items
        assert run["batches"] >= 2 and run["images"] == run["batches"] * run["batch_size"]
        assert run["errors"] == sum(1 for i in range(run["images"]) if (i + run["batch_size"]) % 4 == 3)
        assert run["images_per_second"] > 0 and run["bounding_stage"] in STAGES
        assert run["micro_batch"] == 0 and run["overlap_percent"] == 0.0
    neck = result["bottleneck"]
    assert neck["stage"] in STAGES and neck["runs_on"] == "cpu" and 0 < neck["share_of_handler_time"] <= 1
    recs = result["recommendations"]
    assert set(recs) == RECOMMENDATIONS
    assert all(rec["figure"] for rec in recs.values())
    assert recs["batchSize"]["value"] in (1, 2)
    assert recs["micro_batch"]["value"] == recs["decode_processes"]["value"] == NOT_AVAILABLE
    assert 1 <= recs["workers"]["value"] <= result["host_cpus"]
    assert recs["preprocess_backend"]["value"] == "cpu"  # `auto` on a CPU worker
    assert result["handler"]["backends"]["cvcuda"]  # unusable without CUDA, with the reason


def test_table_names_the_bottleneck(json_run):
    # The same measurement printed as the table (one archive load for the whole module keeps it fast).
    data = json.loads(json_run)
    data["runs"] = [Run(**r) for r in data["runs"]]
    data["recommendations"] = {k: Advice(**v) for k, v in data["recommendations"].items()}
    lines = format_profile(Profile(**data)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    assert lines[header].split()[:8] == ["batch", "read", "fetch", "decode", "upload", "forward", "postproc", "other"]
    rows = [lines[header + 1].split(), lines[header + 2].split()]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[-1] in STAGES for r in rows)
    neck = next(line for line in lines if line.startswith("bottleneck: "))
    assert neck.split()[1] in STAGES and "runs on the CPU" in neck
    for key in RECOMMENDATIONS:
        assert any(line.split()[:1] == [key] for line in lines), key


def test_bad_arguments_are_usage_errors(archive, tmp_path, capsys):
    mar, images = archive
    assert main(["profile", str(mar), "--images", str(images), "--micro-batch", "4"]) == 2
    assert "not available in this version" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.mar"), "--images", str(images)]) == 2
    assert main(["profile", str(mar), "--images", str(tmp_path)]) == 2  # empty directory
    assert "no files" in capsys.readouterr().err
    with pytest.raises(ProfileError, match="--batch-sizes"):
        parse_batch_sizes("0,4")
    assert parse_batch_sizes("8,1,4,4") == [1, 4, 8]
    assert handlers.__name__ == "handlers"
