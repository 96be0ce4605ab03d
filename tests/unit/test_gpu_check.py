"""benchmarks/gpu_check.sh, the one-shot GPU verification runner, checked on a CPU-only host.

A GPU window is short and rare (docs/gpu-verification.md): whatever breaks in the harness there is a
window lost. So CI runs the whole harness in its dry mode (DRY=1: CUDA absent, every GPU step skipped
for that reason and its command line checked), with a bundle built by the same code `make gpu-bundle`
runs, and holds it to the issue's rules: the bundle installs from its file after a sha256 check (a
corrupted one fails clearly), `pytest -m gpu` collects without a single error, the deadline and the
step limits are kept, and OUT holds at most 8 files with a valid result.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = {"summary.txt", "result.json", "result.md", "junit.xml", "logs.tar.gz", "fuzz-findings.tar.gz"}
GPU_STEPS = {"preprocess", "memory", "fuzz", "backbones-fp16", "backbones-bf16"}

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry-run checks expect a host without CUDA")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The GPU bundle, built once per session with the code `make gpu-bundle` runs."""
    out = tmp_path_factory.mktemp("gpu-bundle")
    gpu_check.build_bundle(out)
    return out


def run_harness(tmp_path: Path, bundle: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path / "out"
    settings = {"DRY": "1", "OUT": str(out), "BUNDLE": str(bundle), "WORK": str(tmp_path / "work"),
                "PY": sys.executable, "MODE": "core", **env}
    environment = {k: v for k, v in os.environ.items() if k not in ("MODE", "DEADLINE", "LIMITS", "WHEELS_SHA256")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], cwd=ROOT, env={**environment, **settings},
                          capture_output=True, text=True, timeout=600)
    result = json.loads((out / "result.json").read_text())
    return done, out, result


def steps_of(result: dict) -> dict[str, dict]:
    return {step["name"]: step for step in result["steps"]}


@needs_cpu_only
@pytest.mark.slow
def test_dry_run_on_a_cpu_host_runs_the_whole_harness(tmp_path, bundle):
    done, out, result = run_harness(tmp_path, bundle)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8 and files <= OUTPUTS, files
    assert {"summary.txt", "result.json", "result.md", "junit.xml", "logs.tar.gz"} <= files
    assert all(p.is_file() for p in out.iterdir())
    steps = steps_of(result)
    assert result["mode"] == "core" and result["dry"] is True and result["exit_code"] == 0
    assert list(steps)[:3] == ["bundle", "probe", "pytest-gpu"] and GPU_STEPS <= set(steps)

    # the bundle: checked against its digest, installed from its file, and what the tests imported
    digest = (bundle / f"{gpu_check.BUNDLE_NAME}.sha256").read_text().split()[0]
    assert steps["bundle"]["status"] == "passed" and result["bundle"]["sha256"] == digest
    assert {"torchserve", "torch-model-archiver", "pycocotools"} <= set(result["bundle"]["installed"])
    assert (bundle / gpu_check.BUNDLE_NAME).stat().st_size < 5 * 2**20
    with tarfile.open(out / "logs.tar.gz") as logs:
        probe = json.load(logs.extractfile("logs/probe.json"))
    assert probe["origins"]["torchserve"].startswith(str(tmp_path / "work" / "site")), probe["origins"]

    # pytest -m gpu: collected without a single error, every test skipped for want of CUDA
    tests = steps["pytest-gpu"]["tests"]
    assert steps["pytest-gpu"]["status"] == "passed"
    assert "-m gpu" in steps["pytest-gpu"]["command"] and "--timeout=120" in steps["pytest-gpu"]["command"]
    assert tests["collection_errors"] == 0 and tests["failed"] == 0 and tests["errors"] == 0, tests
    assert tests["collected"] >= 40 and tests["skipped"] == tests["collected"], tests
    assert any("CUDA" in reason for reason in tests["skip_reasons"]), tests["skip_reasons"]
    cases = gpu_check.read_junit(out / "junit.xml")["cases"]
    assert cases and all(outcome.startswith("skipped") for outcome in cases.values())

    # every GPU step: skipped because CUDA is absent, its command line accepted by its script
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped", steps[name]
        assert steps[name]["reason"].startswith("CUDA not available"), steps[name]
        assert steps[name]["dry_check"] == "arguments accepted", steps[name]
    assert result["cuda"]["available"] is False and result["versions"]["torch"] == torch.__version__
    assert {"cpu", "torchvision", "dali", "cvcuda", "tensorrt", "aoti", "cudf"} <= set(result["backends"])

    # every GPU path's tests exist (each matched at least one collected test)
    for path in gpu_check.PATHS:
        if path.tests:
            assert gpu_check.match_tests(path, cases), f"no collected test matches {path.tests}"
    assert "| GPU path |" in (out / "result.md").read_text()
    assert "exit 0" in (out / "summary.txt").read_text()


@needs_cpu_only
def test_a_corrupted_bundle_fails_with_the_reason(tmp_path, bundle):
    broken = tmp_path / "broken-bundle"
    shutil.copytree(bundle, broken)
    tar = broken / gpu_check.BUNDLE_NAME
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    done, out, result = run_harness(tmp_path, broken, DEADLINE="26")
    assert done.returncode == 1
    steps = steps_of(result)
    assert steps["bundle"]["status"] == "failed"
    assert "sha256" in steps["bundle"]["reason"] and "make gpu-bundle" in steps["bundle"]["reason"]
    assert steps["pytest-gpu"]["status"] == "skipped" and "bundle" in steps["pytest-gpu"]["reason"]
    assert result["failed_steps"][0] == "bundle" and "sha256" in (out / "summary.txt").read_text()
    assert len(list(out.iterdir())) <= 8


@needs_cpu_only
def test_deadline_and_step_limits_are_kept(tmp_path, bundle):
    """A step is killed at its limit (exit 124, reported as a timeout); what cannot finish before the
    deadline is skipped and says so; the run ends within the deadline."""
    done, out, result = run_harness(tmp_path, bundle, DEADLINE="30", LIMITS="probe=1")
    steps = steps_of(result)
    assert done.returncode == 1  # the killed step is a failure
    assert steps["probe"]["status"] == "timeout" and steps["probe"]["exit_code"] == 124, steps["probe"]
    assert steps["pytest-gpu"]["status"] == "skipped" and steps["pytest-gpu"]["reason"].startswith("deadline")
    assert result["elapsed_s"] < 30
    assert len(list(out.iterdir())) <= 8 and not (out / "junit.xml").exists()


@needs_cpu_only
def test_dali_mode_installs_the_carried_parts_after_checking_them(tmp_path, bundle):
    """MODE=dali joins the parts ../shared/tools/device-wheels made (p01/part, p02/part, ...), checks the
    joined sha256 and installs the wheels; a wrong digest stops the mode's steps with the reason."""
    wheels = tmp_path / "wheels" / "wheels"
    wheels.mkdir(parents=True)
    with tarfile.open(bundle / gpu_check.BUNDLE_NAME) as archive:
        member = next(m for m in archive.getmembers() if "pytest_timeout" in m.name)
        (wheels / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    joined = tmp_path / "bundle.tar"
    with tarfile.open(joined, "w") as archive:
        archive.add(wheels, arcname="wheels")
    data = joined.read_bytes()
    for i, start in enumerate(range(0, len(data), len(data) // 2 + 1), 1):
        (tmp_path / "wheels" / f"p{i:02d}").mkdir()
        (tmp_path / "wheels" / f"p{i:02d}" / "part").write_bytes(data[start:start + len(data) // 2 + 1])
    digest = hashlib.sha256(data).hexdigest()

    done, out, result = run_harness(tmp_path, bundle, MODE="dali", DEADLINE="40", LIMITS="wheels=20",
                                    WHEELS=str(tmp_path / "wheels"), WHEELS_SHA256=digest)
    steps = steps_of(result)
    assert steps["wheels"]["status"] == "passed", steps["wheels"]
    assert result["wheels"]["parts"] == 2 and result["wheels"]["wheels"] == [p.name for p in wheels.iterdir()]
    assert list(steps)[:4] == ["wheels", "bundle", "probe", "pytest-gpu"]
    assert "-k dali" in steps["pytest-gpu"]["command"]

    shutil.rmtree(out)
    done, out, result = run_harness(tmp_path, bundle, MODE="dali", DEADLINE="25", LIMITS="wheels=5",
                                    WHEELS=str(tmp_path / "wheels"), WHEELS_SHA256="0" * 64)
    steps = steps_of(result)
    assert done.returncode == 1 and steps["wheels"]["status"] == "failed"
    assert "WHEELS_SHA256" in steps["wheels"]["reason"], steps["wheels"]
    assert "wheels" in steps["preprocess"]["reason"]


@pytest.mark.slow
def test_collection_never_stops_when_optional_libraries_are_missing(tmp_path):
    """TorchServe's `ts`, torch-model-archiver and pycocotools hidden: `pytest -m gpu` still collects,
    and each module that needs one is skipped with the reason instead of failing collection."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "HIDDEN = {'ts', 'model_archiver', 'pycocotools'}\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    junit = tmp_path / "junit.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/unit", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", f"--basetemp={tmp_path / 'bt'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    summary = gpu_check.read_junit(junit)
    assert summary["collection_errors"] == 0 and summary["failed"] == 0, summary["failures"]
    reasons = summary["skip_reasons"]
    assert any("TorchServe's Python package is not installed" in r for r in reasons), reasons
    assert "error" not in done.stdout.splitlines()[-1], done.stdout[-500:]


def test_missing_optional_module_is_recognised_only_when_really_absent():
    from tests.conftest import missing_optional_module

    assert missing_optional_module("ModuleNotFoundError: No module named 'no_such_pkg'") is None
    # an installed optional library with a missing submodule is a real error, not an absent library
    pytest.importorskip("ts", reason="TorchServe's Python package is not installed")
    assert missing_optional_module("ModuleNotFoundError: No module named 'ts.nothing'") is None


def test_junit_reading_counts_collection_errors_and_skips(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite>'
        '<testcase classname="" name="tests.unit.test_a"><error message="collection failure">boom</error></testcase>'
        '<testcase classname="" name="tests.unit.test_b"><skipped message="collection skipped">'
        "('/x/tests/unit/test_b.py', None, \"Skipped: ts is not installed\")</skipped></testcase>"
        '<testcase classname="tests.unit.test_c" name="test_x[dali-cuda]"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.unit.test_c" name="test_y"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.unit.test_c" name="test_z"/>'
        "</testsuite></testsuites>")
    summary = gpu_check.read_junit(junit)
    assert (summary["collection_errors"], summary["failed"], summary["passed"], summary["skipped"]) == (1, 1, 1, 2)
    assert summary["skip_reasons"] == {"ts is not installed": 1, "needs CUDA": 1}
    assert summary["cases"]["tests/unit/test_c.py::test_x[dali-cuda]"] == "skipped: needs CUDA"


def test_path_selectors_take_brackets_literally():
    path = gpu_check.GpuPath("x", "y", "dali", ("test_p.py::*[dali-cuda]",))
    cases = {"tests/unit/test_p.py::test_a[dali-cuda]": "passed", "tests/unit/test_p.py::test_a[d-cuda]": "failed",
             "tests/unit/test_q.py::test_a[dali-cuda]": "failed"}
    assert gpu_check.match_tests(path, cases) == {"tests/unit/test_p.py::test_a[dali-cuda]": "passed"}
    assert gpu_check.path_state(path, cases, {}, "2026-12-03") == "passed on 2026-12-03"


def test_stripped_wheel_loses_the_file_and_its_record_line(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/big.jar", b"x" * 1000)
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,,\npkg/big.jar,sha256=abc,1000\nRECORD,,\n")
    assert gpu_check.strip_wheel(wheel, ("pkg/big.jar",)) == 1000
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]
        assert "big.jar" not in z.read("pkg-1.0.dist-info/RECORD").decode()


def test_the_doc_lists_every_gpu_path():
    doc = (ROOT / "docs/gpu-verification.md").read_text()
    missing = [path.what for path in gpu_check.PATHS if path.what not in doc]
    assert not missing, f"docs/gpu-verification.md lacks GPU paths (python -m benchmarks.gpu_check paths): {missing}"


def test_backbones_reports_a_missing_tensorrt_instead_of_raising(monkeypatch):
    """`--backends aoti tensorrt` without torch_tensorrt: TensorRT is reported with the reason and
    left out, so the AOTInductor rows are still measured (it used to raise before the table)."""
    from benchmarks import backbones

    assert "needs a CUDA device" in backbones.unavailable("tensorrt", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import raises ImportError
    reason = backbones.unavailable("tensorrt", torch.device("cuda"))
    assert reason.startswith("torch_tensorrt is not importable") and "torchserve-gpu-handlers[trt]" in reason
    assert backbones.unavailable("aoti", torch.device("cuda")) is None
