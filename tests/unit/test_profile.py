"""`tsgpu profile`: end to end on a tiny archive (loaded in-process like a worker, at two batch sizes
and under pipeline settings, the host's `handlers` surviving it), and the recommendations against
synthetic measurements: each must follow the figures it is given, not a fixed answer."""

from __future__ import annotations

import json
import sys

import psutil
import pytest
import torch

import handlers
from archiver_scripts import samples
from archiver_scripts.cli import main
from archiver_scripts.profile import (
    AUTO,
    NOT_AVAILABLE,
    OTHER,
    Advice,
    Profile,
    ProfileError,
    Run,
    Setting,
    _pipeline_settings,
    best_setting,
    format_profile,
    parse_batch_sizes,
    parse_settings,
    recommend,
    resolve_decode_processes,
    resolve_micro_batches,
)
from handlers.stages import DECODE, FORWARD, STAGES
from tests import models

RECOMMENDATIONS = {"batchSize", "micro_batch", "decode_processes", "workers", "preprocess_backend"}
CPU_BACKENDS = {"cpu": None, "torchvision": None, "dali": None, "cvcuda": "needs CUDA"}


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
    children = {c.pid for c in psutil.Process().children()}
    out = _run(["profile", str(mar), "--images", str(images), "--batch-sizes", "2,4", "--micro-batch", "0,1",
                "--decode-processes", "0,1", "--seconds", "0.05", "--json"])
    assert sys.modules["handlers"] is host_handlers  # the archive's copy was set aside again
    assert torch.get_num_threads() == threads  # the worker's thread sizing did not leak
    assert {c.pid for c in psutil.Process().children()} <= children  # every decode process was stopped
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
    assert result["handler"]["preprocess_backend"] == "cpu" and result["handler"]["pipeline_supported"]
    assert result["handler"]["archive_batch_size"] == 2
    runs = result["runs"]
    # the batch-size sweep on today's path, then every other pipeline setting at the chosen size
    assert [(r["batch_size"], r["micro_batch"], r["decode_processes"]) for r in runs[:2]] == [(2, 0, 0), (4, 0, 0)]
    chosen = result["recommendations"]["batchSize"]["value"]
    assert [(r["batch_size"], r["micro_batch"], r["decode_processes"]) for r in runs[2:]] == [
        (chosen, 0, 1), (chosen, 1, 0), (chosen, 1, 1)]
    for run in runs:
        assert set(run["ms_per_image"]) == {*STAGES, OTHER}
        assert run["ms_per_image"]["DecodeTime"] > 0 and run["ms_per_image"]["ForwardTime"] > 0
        assert run["ms_per_image"]["FetchTime"] == 0  # no URL items
        assert run["batches"] >= 2 and run["images"] == run["batches"] * run["batch_size"]
        # the bad file is answered on its own under every setting (pipeline and decode processes too)
        assert run["errors"] == sum(1 for i in range(run["images"]) if (i + run["batch_size"]) % 4 == 3), run
        assert run["images_per_second"] > 0 and run["bounding_stage"] in STAGES and run["cpu_cores_busy"] > 0
        assert 1 <= run["torch_threads"] <= result["handler"]["worker_cpus"]
    assert all(r["overlap_percent"] == 0.0 for r in runs if r["micro_batch"] == 0)
    neck = result["bottleneck"]
    assert neck["stage"] in STAGES and neck["runs_on"] == "cpu" and 0 < neck["share_of_handler_time"] <= 1
    recs = result["recommendations"]
    assert set(recs) == RECOMMENDATIONS
    assert all(rec["figure"] for rec in recs.values())
    assert recs["batchSize"]["value"] in (2, 4)
    # the pipeline advice is the measured best (simplest within 5%), with its own figure
    best = best_setting([Run(**r) for r in runs if r["batch_size"] == chosen])
    assert (recs["micro_batch"]["value"], recs["decode_processes"]["value"]) == (
        best.micro_batch, best.decode_processes)
    assert f"{best.images_per_second:.1f} img/s" in recs["micro_batch"]["figure"]
    assert (neck["micro_batch"], neck["decode_processes"]) == (best.micro_batch, best.decode_processes)
    assert 1 <= recs["workers"]["value"] <= result["host_cpus"]
    assert recs["preprocess_backend"]["value"] == "cpu"  # `auto` on a CPU worker
    assert result["handler"]["backends"]["cvcuda"]  # unusable without CUDA, with the reason


def test_table_names_the_bottleneck(json_run):
    # The same measurement printed as the table (one profile for the whole module keeps it fast).
    data = json.loads(json_run)
    data["runs"] = [Run(**r) for r in data["runs"]]
    data["recommendations"] = {k: Advice(**v) for k, v in data["recommendations"].items()}
    lines = format_profile(Profile(**data)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    assert lines[header].split()[:11] == ["batch", "mb", "dp", "thr", "read", "fetch", "decode", "upload",
                                          "forward", "postproc", "other"]
    rows = [lines[header + 1 + k].split() for k in range(len(data["runs"]))]
    assert [r[:3] for r in rows[:2]] == [["2", "0", "0"], ["4", "0", "0"]] and all(r[-1] in STAGES for r in rows)
    neck = next(line for line in lines if line.startswith("bottleneck: "))
    assert neck.split()[1] in STAGES and "runs on the CPU" in neck
    for key in RECOMMENDATIONS:
        assert any(line.split()[:1] == [key] for line in lines), key


def test_bad_arguments_are_usage_errors(archive, tmp_path, capsys):
    mar, images = archive
    assert main(["profile", str(mar), "--images", str(images), "--micro-batch", "-1"]) == 2
    assert "--micro-batch" in capsys.readouterr().err
    assert main(["profile", str(mar), "--images", str(images), "--decode-processes", "two"]) == 2
    assert "--decode-processes" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.mar"), "--images", str(images)]) == 2
    assert main(["profile", str(mar), "--images", str(tmp_path)]) == 2  # empty directory
    assert "no files" in capsys.readouterr().err
    with pytest.raises(ProfileError, match="--batch-sizes"):
        parse_batch_sizes("0,4")
    assert parse_batch_sizes("8,1,4,4") == [1, 4, 8]
    assert parse_settings("0,auto,4,0", "--micro-batch") == [0, AUTO, 4]  # order kept: the first is the sweep's
    assert handlers.__name__ == "handlers"


def test_auto_values_and_skipped_micro_batches():
    assert resolve_micro_batches([0, AUTO], 8) == [0, 4] and resolve_micro_batches([AUTO, 4], 8) == [4]
    assert resolve_decode_processes([0, AUTO], 2) == [0, 1] and resolve_decode_processes([AUTO], 8) == [4]
    assert resolve_decode_processes([AUTO], 1) == [1]
    notes: list[str] = []
    settings = _pipeline_settings([0, 2, 8], [0, 1], 8, Setting(0, 0), notes)
    assert settings == [Setting(0, 1), Setting(2, 0), Setting(2, 1)]
    assert len(notes) == 1 and "micro_batch 8 skipped at batch 8" in notes[0]


# -- recommendations from synthetic measurements --------------------------------------------------


def _run_record(bs: int, mb: int, dp: int, ips: float, decode: float = 5.0, forward: float = 2.0,
                cores: float = 1.0) -> Run:
    ms = {name: 0.0 for name in STAGES}
    ms.update({DECODE: decode, FORWARD: forward})
    ms[OTHER] = 0.1
    return Run(batch_size=bs, micro_batch=mb, decode_processes=dp, batches=10, images=10 * bs, errors=0,
               wall_seconds=1.0, images_per_second=ips, ms_per_image=ms, device_idle_ms_per_batch=0.2,
               overlap_percent=30.0 if mb else 0.0, cpu_cores_busy=cores,
               bounding_stage=DECODE if decode >= forward else FORWARD)


def _recommend(runs: list[Run], reason: str | None = None) -> dict[str, Advice]:
    return recommend(runs, "cpu", "cpu", CPU_BACKENDS, "cpu", 2, 8, reason)


def _sweep() -> list[Run]:
    return [_run_record(1, 0, 0, 30.0), _run_record(4, 0, 0, 55.0), _run_record(8, 0, 0, 60.0)]


def test_micro_batch_follows_the_measurement():
    faster = _recommend([*_sweep(), _run_record(8, 4, 0, 80.0), _run_record(8, 0, 2, 62.0), _run_record(8, 4, 2, 81.0)])
    assert faster["batchSize"].value == 8
    # 81 (4, 2) is the top; 80 (4, 0) is within 5% with no decode processes: the simpler wins
    assert (faster["micro_batch"].value, faster["decode_processes"].value) == (4, 0)
    assert "80.0 img/s at micro_batch 4 vs 60.0 at 0" in faster["micro_batch"].figure
    assert "80.0 img/s at decode_processes 0 vs 81.0 at 2" in faster["decode_processes"].figure
    assert "within 5%" in faster["decode_processes"].figure

    slower = _recommend([*_sweep(), _run_record(8, 4, 0, 50.0), _run_record(8, 0, 2, 61.0), _run_record(8, 4, 2, 52.0)])
    assert (slower["micro_batch"].value, slower["decode_processes"].value) == (0, 0)
    assert "60.0 img/s at micro_batch 0 vs 50.0 at 4" in slower["micro_batch"].figure


def test_decode_processes_follow_the_measurement():
    advice = _recommend([*_sweep(), _run_record(8, 4, 0, 62.0), _run_record(8, 0, 2, 90.0, decode=2.0),
                         _run_record(8, 4, 2, 85.0, cores=1.9)])
    assert (advice["micro_batch"].value, advice["decode_processes"].value) == (0, 2)
    assert "90.0 img/s at decode_processes 2 vs 60.0 at 0" in advice["decode_processes"].figure
    assert "decode 2.00 vs 5.00 ms/img" in advice["decode_processes"].figure
    assert ("90.0 img/s at micro_batch 0 vs 85.0 at 4 (batch 8, decode_processes 2; faster)"
            in advice["micro_batch"].figure)
    # the chosen run's CPU use sizes the workers: 1.0 core busy on 2 CPUs -> 2 workers
    assert advice["workers"].value == 2 and "keeps 1.00 of 2 CPUs busy" in advice["workers"].figure

    busy = _recommend([*_sweep(), _run_record(8, 0, 2, 90.0, cores=1.95)])
    assert busy["decode_processes"].value == 2 and busy["workers"].value == 1


def test_batch_size_comes_from_the_sweep_and_pipeline_runs_at_it():
    runs = [_run_record(1, 0, 0, 30.0), _run_record(4, 0, 0, 70.0), _run_record(8, 0, 0, 68.0),
            _run_record(4, 2, 0, 90.0)]
    advice = _recommend(runs)
    assert advice["batchSize"].value == 4 and "70.0 img/s at batch 4 vs 30.0 at 1" in advice["batchSize"].figure
    assert advice["micro_batch"].value == 2
    assert "90.0 img/s at micro_batch 2 vs 70.0 at 0" in advice["micro_batch"].figure
    assert "no other value measured" in advice["decode_processes"].figure


def test_unmeasurable_pipeline_is_reported_not_guessed():
    advice = _recommend(_sweep(), reason="this archive's handlers predate handler.pipeline")
    assert advice["micro_batch"].value == advice["decode_processes"].value == NOT_AVAILABLE
    assert "predate handler.pipeline" in advice["micro_batch"].figure
