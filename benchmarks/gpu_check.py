"""GPU verification in one shot: every GPU path this library can run on a short GPU window, reported.

The GPU host this project is lent is short and bare (docs/gpu-verification.md): one H200, 15 minutes
in all, at most 10 minutes and 64 MiB of files per command, no package index, Python 3.12 with its own
torch/torchvision (CUDA 13), and at most 8 files brought back. So this runner:

- runs against the host's torch and torchvision and never installs the project's pins; every compiled
  artifact (AOTInductor packages) is built on the host;
- installs only a small bundle (`make gpu-bundle`: TorchServe's Python package without its Java
  frontend jar, torch-model-archiver, pycocotools, pytest-timeout as a fallback), sha256-checked,
  with `pip --no-index --no-deps --target` into a scratch folder; the repository itself is the working
  tree that every device call sends (see the doc for why it is not in the bundle);
- runs its steps in order of value, each under its own time limit, and skips (and reports as
  skipped) what cannot finish before DEADLINE;
- writes at most 6 files into OUT: summary.txt, result.json, result.md, junit.xml, logs.tar.gz and,
  when the fuzzer found something, fuzz-findings.tar.gz; exits 1 when any step failed.

    MODE=core|dali|cvcuda [OUT=gpu-results] [DEADLINE=420] bash benchmarks/gpu_check.sh
    DRY=1 OUT=/tmp/dry bash benchmarks/gpu_check.sh     # the whole harness on a CPU-only host (CI)
    python -m benchmarks.gpu_check bundle [--out gpu-bundle]   # what `make gpu-bundle` runs
    python -m benchmarks.gpu_check paths                 # the GPU paths table, states "never run"

Settings (environment): MODE (core), OUT (gpu-results), DEADLINE (420 s), DRY (0), BUNDLE (gpu-bundle),
BUNDLE_SHA256 (optional: the digest `make gpu-bundle` printed), WORK (/tmp/tsgpu-gpu-check: scratch,
logs, installed bundle), WHEELS (.devwheels) and WHEELS_SHA256 (dali/cvcuda modes: the parts that
../shared/tools/device-wheels made and the joined sha256 it printed), WHEELS_SITE (/tmp/site: wheels
installed earlier by device-wheels' own command), TEST_TIMEOUT (120 s per test), LIMITS
(`step=seconds,...`: override step limits). DRY=1 runs everything that needs no GPU for real (bundle
install, environment probe, `pytest -m gpu` collection with every test skipped) and checks the command
line of every GPU step instead of running it; without DRY, a host without CUDA is a failed run.

Only the standard library is imported here (the runner must start on any Python); torch is imported by
the steps, in subprocesses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent

MODES = ("core", "dali", "cvcuda")
MAX_OUTPUT_FILES = 8  # what the device tool brings back from $OUT
RESERVE_S = 15  # kept back from DEADLINE for writing the results
WORK_MARK = ".tsgpu-gpu-check"

# --- the bundle ---------------------------------------------------------------------------------

BUNDLE_NAME = "tsgpu-gpu-bundle.tar"
BUNDLE_PYTHON = "3.12"  # the GPU host's Python
# What the GPU host lacks to import and collect the tests (docs/gpu-verification.md lists the host's packages).
BUNDLE_PINS = ("torchserve==0.12.0", "torch-model-archiver==0.12.0", "pycocotools==2.0.11")
# pytest-timeout gives per-test limits; installed only where the host has none (a newer copy stays).
BUNDLE_FALLBACK_PINS = ("pytest-timeout==2.4.0",)
# TorchServe's frontend jar (46 MB) is the Java server: importing `ts` in a test or a worker never needs it.
STRIPPED = {"torchserve": ("ts/frontend/model-server.jar",)}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(pins: tuple[str, ...], dest: Path, python_version: str | None) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if python_version:
        cmd += ["--python-version", python_version, "--implementation", "cp"]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
    done = subprocess.run(cmd + list(pins), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"pip download {' '.join(pins)} failed (python -m pip must reach a package index):\n{tail}")


def strip_wheel(wheel: Path, remove: tuple[str, ...]) -> int:
    """Rewrite `wheel` without the files in `remove` (and their RECORD lines); returns bytes removed."""
    removed = 0
    out = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in remove:
                removed += info.file_size
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode("utf-8").splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in remove).encode("utf-8")
            dst.writestr(info, data)
    out.replace(wheel)
    return removed


def _dist_of(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return name.replace("_", "-").lower(), version


def build_bundle(out: Path, python_version: str = BUNDLE_PYTHON) -> Path:
    """Download, strip and pack the bundle into out/tsgpu-gpu-bundle.tar (+ .sha256); returns the tar."""
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / BUNDLE_NAME, out / f"{BUNDLE_NAME}.sha256"):
        old.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="tsgpu-bundle-") as tmp:
        wheels = Path(tmp) / "wheels"
        wheels.mkdir()
        _pip_download(BUNDLE_PINS + BUNDLE_FALLBACK_PINS, wheels, python_version)
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if here != python_version:  # the dry run here installs the same bundle: add this Python's binary wheels
            _pip_download(("pycocotools==" + _pin_version("pycocotools"),), wheels, None)
        stripped = {}
        for wheel in sorted(wheels.glob("*.whl")):
            dist, _version = _dist_of(wheel)
            if dist in STRIPPED:
                stripped[wheel.name] = {"removed": list(STRIPPED[dist]), "bytes": strip_wheel(wheel, STRIPPED[dist])}
        # No dates, no commit: the same pins built with the same Python give the same bytes and digest.
        manifest = {
            "for_python": python_version,
            "install": [p.split("==")[0] for p in BUNDLE_PINS],
            "install_if_missing": [p.split("==")[0] for p in BUNDLE_FALLBACK_PINS],
            "stripped": stripped,
            "wheels": [{"file": w.name, "dist": _dist_of(w)[0], "version": _dist_of(w)[1], "bytes": w.stat().st_size,
                        "sha256": sha256_file(w)} for w in sorted(wheels.glob("*.whl"))],
        }
        (Path(tmp) / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        tar = out / BUNDLE_NAME
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:  # wheels are compressed already
            archive.add(Path(tmp) / "MANIFEST.json", arcname="MANIFEST.json", filter=_reproducible)
            for wheel in sorted(wheels.glob("*.whl")):
                archive.add(wheel, arcname=f"wheels/{wheel.name}", filter=_reproducible)
    digest = sha256_file(tar)
    (out / f"{BUNDLE_NAME}.sha256").write_text(f"{digest}  {BUNDLE_NAME}\n")
    return tar


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
    return info


def _pin_version(dist: str) -> str:
    return next(p.split("==")[1] for p in BUNDLE_PINS + BUNDLE_FALLBACK_PINS if p.split("==")[0] == dist)


def cmd_bundle(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py bundle", description="build the GPU bundle (make gpu-bundle)")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-bundle")
    parser.add_argument("--python-version", default=BUNDLE_PYTHON, help="the GPU host's Python (default 3.12)")
    args = parser.parse_args(argv)
    tar = build_bundle(args.out, args.python_version)
    manifest = json.loads(tarfile.open(tar).extractfile("MANIFEST.json").read())
    size = tar.stat().st_size
    print(f"{tar} ({size / 2**20:.2f} MiB, {len(manifest['wheels'])} wheels):")
    for wheel in manifest["wheels"]:
        print(f"  {wheel['file']}  {wheel['bytes'] / 2**10:.0f} KiB")
    for name, info in manifest["stripped"].items():
        print(f"  ({name}: removed {', '.join(info['removed'])}, {info['bytes'] / 2**20:.1f} MiB)")
    print(f"sha256 {sha256_file(tar)}  (in {tar.name}.sha256; the runner checks it on arrival)")
    if size > 5 * 2**20:
        print(f"WARNING: the bundle is {size / 2**20:.1f} MiB, over the 5 MiB it is meant to stay under")
    return 0


# --- steps --------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str
    argv: list[str] | None = None  # None: done in-process
    limit_s: float = 60
    need_s: float = 10  # start only with at least this much time left before the deadline
    gpu: bool = False  # runs only with CUDA (checked, not run, in a dry run)
    after: tuple[str, ...] = ()  # steps that must have passed first
    kind: str = "bench"  # setup | probe | pytest | bench | fuzz


@dataclass
class Outcome:
    name: str
    what: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    exit_code: int | None = None
    limit_s: float | None = None
    reason: str | None = None
    command: str | None = None
    log: str | None = None
    tests: dict[str, Any] | None = None
    dry_check: str | None = None
    highlights: list[str] = field(default_factory=list)


@dataclass
class Settings:
    mode: str
    out: Path
    deadline_s: float
    dry: bool
    bundle: Path
    bundle_sha256: str | None
    work: Path
    wheels: Path
    wheels_sha256: str | None
    wheels_site: Path
    python: str
    test_timeout_s: int
    limits: dict[str, float]

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        mode = env.get("MODE", "core") or "core"
        if mode not in MODES:
            raise SystemExit(f"MODE={mode!r}: expected one of {', '.join(MODES)}")
        limits = {}
        for item in filter(None, env.get("LIMITS", "").split(",")):
            name, _, seconds = item.partition("=")
            try:
                limits[name.strip()] = float(seconds)
            except ValueError:
                raise SystemExit(f"LIMITS={env['LIMITS']!r}: expected step=seconds,...") from None
        try:
            deadline = float(env.get("DEADLINE", "420") or 420)
            test_timeout = int(env.get("TEST_TIMEOUT", "120") or 120)
        except ValueError as exc:
            raise SystemExit(f"DEADLINE/TEST_TIMEOUT must be numbers: {exc}") from None

        def path(key: str, default: str) -> Path:
            p = Path(env.get(key) or default)
            return p if p.is_absolute() else ROOT / p

        return cls(
            mode=mode, out=path("OUT", "gpu-results"), deadline_s=deadline, dry=env.get("DRY", "0") not in ("", "0"),
            bundle=path("BUNDLE", "gpu-bundle"), bundle_sha256=env.get("BUNDLE_SHA256") or None,
            work=path("WORK", "/tmp/tsgpu-gpu-check"), wheels=path("WHEELS", ".devwheels"),
            wheels_sha256=env.get("WHEELS_SHA256") or None, wheels_site=path("WHEELS_SITE", "/tmp/site"),
            python=env.get("PY") or sys.executable, test_timeout_s=test_timeout, limits=limits,
        )


def plan(s: Settings) -> list[Step]:
    """The steps of a mode, in order of value: what verifies the most, soonest."""
    py, work = s.python, s.work
    steps: list[Step] = []
    if s.mode != "core":
        steps.append(Step("wheels", f"install the {s.mode} wheels carried by ../shared/tools/device-wheels",
                          limit_s=180, need_s=30, kind="setup"))
    setup = ("wheels",) if s.mode != "core" else ()
    steps += [
        Step("bundle", "check the bundle's sha256, install it with pip --no-index --no-deps --target",
             limit_s=120, need_s=10, kind="setup"),
        Step("probe", "versions of torch/CUDA/driver/GPU libraries, each backend's availability",
             [py, "-m", "benchmarks.gpu_check", "probe", str(work / "probe.json")],
             limit_s=120, need_s=10, kind="probe"),
    ]
    selector = {"core": [], "dali": ["-k", "dali"], "cvcuda": ["-k", "cvcuda"]}[s.mode]
    steps.append(Step(
        "pytest-gpu", "every gpu-marked test" + ("" if s.mode == "core" else f" of the {s.mode} backend")
        + f" (-m gpu{' ' + ' '.join(selector) if selector else ''}), one run",
        [py, "-m", "pytest", "tests/unit", "-m", "gpu", *selector, "-q", "-rs", "-p", "no:cacheprovider",
         f"--junitxml={s.out / 'junit.xml'}", f"--basetemp={work / 'pytest'}"],
        limit_s=300, need_s=60, after=("bundle", *setup), kind="pytest"))
    if s.mode == "core":
        steps += [
            Step("preprocess", "throughput table on CUDA, 1080p: torchvision nvJPEG vs CPU decode + upload vs stock",
                 [py, "-m", "benchmarks.preprocess", "--device", "cuda", "--sizes", "1080p", "--batches", "8", "64",
                  "--seconds", "1", "--backends", "torchvision", "cpu"], limit_s=150, need_s=40, gpu=True),
            Step("memory", "memory growth, torchvision backend on CUDA, 3,000 requests",
                 [py, "-m", "benchmarks.preprocess_memory", "--backend", "torchvision", "--device", "cuda",
                  "--requests", "3000", "--warmup", "300", "--every", "500"], limit_s=150, need_s=60, gpu=True),
            Step("fuzz", "30 s of mutated images through every backend available on CUDA",
                 [py, str(ROOT / "fuzz/fuzz_decode.py"), "--seconds", "30", "--device", "cuda",
                  "--findings", str(work / "fuzz-findings")], limit_s=90, need_s=50, gpu=True, kind="fuzz"),
            Step("backbones-fp16", "ResNet-50 eager vs AOTInductor fp16 (and TensorRT if importable), cuda:0",
                 [py, "-m", "benchmarks.backbones", "--device", "cuda:0", "--batches", "1", "8", "32", "--repeat", "20",
                  "--backends", "aoti:fp16", "tensorrt:fp16", "--cache-dir", str(work / "compile-cache")],
                 limit_s=240, need_s=100, gpu=True),
            Step("backbones-bf16", "ResNet-50 eager vs AOTInductor bf16, cuda:0",
                 [py, "-m", "benchmarks.backbones", "--device", "cuda:0", "--batches", "1", "8", "32", "--repeat", "20",
                  "--backends", "aoti:bf16", "--cache-dir", str(work / "compile-cache")],
                 limit_s=240, need_s=100, gpu=True),
        ]
    else:
        steps += [
            Step("preprocess", f"throughput row on CUDA, 1080p: {s.mode} vs stock",
                 [py, "-m", "benchmarks.preprocess", "--device", "cuda", "--sizes", "1080p", "--batches", "8", "64",
                  "--seconds", "1", "--backends", s.mode], limit_s=150, need_s=40, gpu=True, after=setup),
            Step("memory", f"memory growth, {s.mode} backend on CUDA, 3,000 requests",
                 [py, "-m", "benchmarks.preprocess_memory", "--backend", s.mode, "--device", "cuda",
                  "--requests", "3000", "--warmup", "300", "--every", "500"], limit_s=150, need_s=60, gpu=True,
                 after=setup),
            Step("fuzz", "20 s of mutated images through every backend available on CUDA",
                 [py, str(ROOT / "fuzz/fuzz_decode.py"), "--seconds", "20", "--device", "cuda",
                  "--findings", str(work / "fuzz-findings")], limit_s=80, need_s=40, gpu=True, kind="fuzz",
                 after=setup),
        ]
    for step in steps:
        if step.name in s.limits:
            step.limit_s = s.limits[step.name]
            step.need_s = min(step.need_s, step.limit_s)
    return steps


# --- processes ----------------------------------------------------------------------------------


def _kill_group(pgid: int, grace_s: float = 3.0) -> None:
    """End every process of the group: SIGTERM, then SIGKILL for what is still there after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    stop = time.monotonic() + grace_s
    while time.monotonic() < stop:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(argv: list[str], log: Path, limit_s: float, env: dict[str, str]) -> tuple[int, bool]:
    """Run argv in its own process group under `limit_s`; (exit code, timed out). The whole group is
    ended afterwards, so nothing a step started (decode processes, compile workers) outlives it."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n(limit {limit_s:.0f} s)\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, limit_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            code, timed_out = 124, True
            out.write(f"\n== killed after its limit of {limit_s:.0f} s\n".encode())
        _kill_group(proc.pid)
    return code, timed_out


def tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


# --- junit --------------------------------------------------------------------------------------


def read_junit(path: Path) -> dict[str, Any]:
    """Counts, failing tests, skip reasons and each test's outcome from pytest's junit XML."""
    summary: dict[str, Any] = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                               "collection_errors": 0, "failures": [], "skip_reasons": {}, "cases": {}}
    if not path.exists():
        return summary
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        node = (classname.replace(".", "/") + ".py::" + name) if classname else name.replace(".", "/") + ".py"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if error is not None and error.get("message") == "collection failure":
            summary["collection_errors"] += 1
            summary["failures"].append(f"{node}: collection error")
            summary["cases"][node] = "error"
            continue
        summary["collected"] += 1
        if failure is not None or error is not None:
            kind = "failed" if failure is not None else "errors"
            summary[kind] += 1
            message = (failure if failure is not None else error).get("message", "")
            summary["failures"].append(f"{node}: {message.splitlines()[0][:200] if message else kind}")
            summary["cases"][node] = "failed"
        elif skipped is not None:
            summary["skipped"] += 1
            reason = _skip_reason(skipped)
            summary["skip_reasons"][reason] = summary["skip_reasons"].get(reason, 0) + 1
            summary["cases"][node] = "skipped: " + reason
        else:
            summary["passed"] += 1
            summary["cases"][node] = "passed"
    return summary


def _skip_reason(element: ElementTree.Element) -> str:
    text = element.get("message") or ""
    if text == "collection skipped":  # a module skipped at collection: the reason is in the body
        match = re.search(r"Skipped: (.*?)[\"']\)$", element.text or "")
        text = match.group(1) if match else (element.text or text)
    return re.sub(r"^Skipped: ", "", text).strip()[:300]


# --- the GPU paths and what verifies them ---------------------------------------------------------


@dataclass(frozen=True)
class GpuPath:
    what: str
    where: str
    mode: str  # core | dali | cvcuda | "" (no mode carries what it needs yet)
    tests: tuple[str, ...] = ()  # FILE.py::NAME patterns; `*` is the only wildcard
    steps: tuple[str, ...] = ()
    note: str = ""


PATHS: tuple[GpuPath, ...] = (
    GpuPath("torchvision backend on CUDA: nvJPEG batch decode, item-by-item retry, resize on the GPU, current stream",
            "handlers/preprocess/torchvision_gpu.py", "core",
            ("test_preprocess_backends.py::*[torchvision-cuda]",
             "test_preprocess_backends.py::test_gpu_backend_runs_on_the_current_stream[torchvision]")),
    GpuPath("geometry modes on CUDA (torchvision)", "handlers/preprocess/torchvision_gpu.py", "core",
            ("test_geometry.py::test_accelerated_backends_meet_the_contract_in_every_mode[torchvision-cuda-*]",)),
    GpuPath("pinned upload of CPU-decoded items", "handlers/preprocess/cpu.py", "core",
            ("test_gpu_path_defects.py::test_cpu_upload_on_gpu_is_from_pinned_memory",)),
    GpuPath("decode processes' page-locked shared frames (cudaHostRegister)", "handlers/preprocess/host/frames.py, host/upload.py",
            "core", ("test_decode_pool.py::test_on_a_gpu_the_shared_frames_are_page_locked_and_match_threads",)),
    GpuPath("detector post-processing and float64 batched NMS on CUDA", "handlers/tasks/detector.py", "core",
            ("test_detector.py::test_post_processing_on_cuda_matches_cpu*",)),
    GpuPath("segmenter label maps (nearest, bilinear in row chunks) on CUDA", "handlers/tasks/segmenter.py", "core",
            ("test_segmenter.py::test_label_maps_on_cuda_match_cpu",)),
    GpuPath("a handler on a GPU worker: select_device, ExportedProgram on cuda, warm-up, masks/vectors",
            "handlers/runtime.py, backbone.py, tasks/segmenter.py, tasks/embedder.py", "core",
            ("test_segmenter.py::test_handler_on_cuda_masks_land_on_drawn_pixels*",
             "test_embedder.py::test_vectors_on_cuda_match_reference")),
    GpuPath("AOTInductor package built for CUDA: compile, load, chosen over a CPU artifact",
            "archiver_scripts/compile.py, handlers/backbone.py, handlers/artifacts.py", "core",
            ("test_compile.py::test_aoti_on_gpu_is_chosen_over_cpu_artifact",)),
    GpuPath("`--device cuda:N` (N=0 on a one-GPU host): compile under torch.cuda.device(N), load with device_index=N",
            "archiver_scripts/compile.py", "core", steps=("backbones-fp16",)),
    GpuPath("micro-batch pipeline: upload, forward and postprocess streams ordered by events",
            "handlers/pipeline.py", "core", ("test_pipeline.py::test_gpu_streams_order_upload_forward_postprocess",)),
    GpuPath("stage timing with CUDA events (ForwardTime, DeviceIdleTime) without synchronize", "handlers/stages.py",
            "core", ("test_stage_metrics.py::test_cuda_forward_is_timed_by_events_without_synchronize",)),
    GpuPath("preprocess throughput on CUDA, 1080p (torchvision vs CPU decode + upload vs stock)",
            "benchmarks/preprocess.py", "core", steps=("preprocess",)),
    GpuPath("GPU memory growth, torchvision backend (short run)", "benchmarks/preprocess_memory.py", "core",
            steps=("memory",)),
    GpuPath("decoders on mutated inputs on CUDA (fuzz)", "fuzz/fuzz_decode.py", "core", steps=("fuzz",)),
    GpuPath("ResNet-50 eager vs AOTInductor fp16 / bf16 on CUDA", "benchmarks/backbones.py", "core",
            steps=("backbones-fp16", "backbones-bf16")),
    GpuPath("DALI mixed decoder on CUDA: output contract, DLPack to torch's stream, geometry modes",
            "handlers/preprocess/dali.py", "dali",
            ("test_preprocess_backends.py::*[dali-cuda]",
             "test_preprocess_backends.py::test_gpu_backend_runs_on_the_current_stream[dali]",
             "test_geometry.py::test_accelerated_backends_meet_the_contract_in_every_mode[dali-cuda-*]")),
    GpuPath("DALI copy-out ordering (event after the copy, waited on before the next run)",
            "handlers/preprocess/dali.py", "dali",
            ("test_gpu_path_defects.py::test_dali_copy_is_complete_before_the_next_run_on_gpu",)),
    GpuPath("DALI throughput row and memory growth", "benchmarks/preprocess.py, preprocess_memory.py", "dali",
            steps=("preprocess", "memory")),
    GpuPath("CV-CUDA backend: nvImageCodec decode, hq_resize_into with ROI, letterbox placement, current stream",
            "handlers/preprocess/cvcuda.py", "cvcuda",
            ("test_preprocess_backends.py::*[cvcuda-cuda]",
             "test_preprocess_backends.py::test_gpu_backend_runs_on_the_current_stream[cvcuda]",
             "test_geometry.py::test_accelerated_backends_meet_the_contract_in_every_mode[cvcuda-cuda-*]")),
    GpuPath("CV-CUDA throughput row and memory growth", "benchmarks/preprocess.py, preprocess_memory.py", "cvcuda",
            steps=("preprocess", "memory")),
    GpuPath("instance masks, keypoints and DETR decoding on CUDA vs CPU",
            "handlers/tasks/instances.py, tasks/keypoints.py, tasks/masks.py, tasks/detector.py", "core",
            ("test_instances.py::test_post_processing_on_cuda_matches_cpu*",
             "test_keypoints.py::test_post_processing_on_cuda_matches_cpu*",
             "test_detector_detr.py::test_detr_post_processing_on_cuda_matches_cpu*")),
    GpuPath("video frames on the device -> model input (the torchvision backend's resize), CUDA tolerance",
            "handlers/preprocess/frames.py", "core", ("test_video_handler.py::test_frames_on_cuda_meet_the_gpu_contract*",)),
    GpuPath("a clip through a video archive on a CUDA worker (CPU decode + upload, prefetch thread)",
            "handlers/video/serve.py", "", ("test_video_handler.py::test_a_clip_classified_on_a_cuda_worker",),
            note="needs PyAV, which no mode carries yet; a core run reports the test skipped"),
    GpuPath("torchcodec NVDEC decode: frames on the model's device, same indices, times and pixels as the CPU decoders",
            "handlers/video/torchcodec.py, handlers/video/decode.py", "",
            ("test_video_decode.py::test_nvdec_frames_land_on_the_device_and_match_cpu",),
            note="needs PyAV, a torchcodec built for the host's torch and FFmpeg's shared libraries, which no mode "
                 "carries yet; a core run reports the test skipped"),
    GpuPath("cascade on CUDA: decoded images kept on the device (torchvision, cvcuda), crops and second model there",
            "handlers/tasks/cascade.py, handlers/preprocess/*.py (keep_images)", "",
            note="no GPU test written yet: run tests/unit/test_cascade.py's crop and embedding checks with a CUDA device"),
    GpuPath("tsgpu batch --device cuda (local engine, one GPU per worker, round robin)", "offline/worker.py, engines/local.py",
            "", note="no GPU test written yet: test_batch_sameness.py's comparison on a GPU host with torchserve"),
    GpuPath("Torch-TensorRT compile and load (fp16, fp32)", "archiver_scripts/compile.py (build_tensorrt)", "",
            ("test_compile.py::test_tensorrt_on_gpu*",),
            note="no mode carries it: torch-tensorrt must match the host's torch minor (2.11 there) and TensorRT's "
                 "libraries (tensorrt-cu13-libs) come only as a source package that downloads them at install; "
                 "a core run reports the test skipped"),
    GpuPath("cuDF result tables", "handlers/tables.py", "",
            ("test_tables.py::test_cudf_engine_gives_the_same_results_as_pandas",),
            note="no mode carries cudf-cu13 and its RAPIDS libraries; a core run reports the test skipped"),
    GpuPath("one pipelined GPU worker vs several workers (serving)", "benchmarks/serving_pipeline.py", "",
            note="needs TorchServe's Java frontend and a Java runtime, which the bundle leaves out"),
)


def _pattern(selector: str) -> re.Pattern[str]:
    return re.compile(".*".join(map(re.escape, selector.split("*"))) + "$")


def match_tests(path: GpuPath, cases: dict[str, str]) -> dict[str, str]:
    """The test outcomes (node -> outcome) that verify `path`."""
    patterns = [_pattern(selector) for selector in path.tests]
    return {node: outcome for node, outcome in cases.items()
            if any(p.match(node.split("/")[-1]) for p in patterns)}


def path_state(path: GpuPath, cases: dict[str, str], outcomes: dict[str, Outcome], date: str) -> str:
    tests = match_tests(path, cases)
    steps = [outcomes[name] for name in path.steps if name in outcomes]
    failed = [n for n, o in tests.items() if o in ("failed", "error")] + [o.name for o in steps
                                                                        if o.status in ("failed", "timeout")]
    passed = [n for n, o in tests.items() if o == "passed"] + [o.name for o in steps if o.status == "passed"]
    skipped = {o.split(": ", 1)[1] for o in tests.values() if o.startswith("skipped")}
    skipped |= {o.reason or "skipped" for o in steps if o.status == "skipped"}
    if failed:
        return f"failed on {date} ({len(failed)} of {len(tests) + len(steps)})"
    if passed:
        part = f" ({len(passed)} passed, others skipped: {'; '.join(sorted(skipped))})" if skipped else ""
        return f"passed on {date}{part}"
    if not tests and path.tests:
        return "not run: no test matched (not collected?)"
    return "not run: " + ("; ".join(sorted(skipped)) if skipped else "not in this run")


def paths_table(cases: dict[str, str] | None = None, outcomes: dict[str, Outcome] | None = None,
                date: str = "", mode: str | None = None) -> str:
    """The GPU paths as a markdown table; without results every state is "never run"."""
    rows = ["| GPU path | where | mode | verified by | state |", "|---|---|---|---|---|"]
    for path in PATHS:
        if mode is not None and path.mode not in (mode, "" if mode == "core" else mode):
            continue
        verified = ", ".join([f"`{t}`" for t in path.tests] + [f"step `{s}`" for s in path.steps]) or "-"
        state = "never run" if cases is None else path_state(path, cases, outcomes or {}, date)
        if path.note:
            state += f" ({path.note})"
        rows.append(f"| {path.what} | `{path.where}` | {path.mode or '-'} | {verified} | {state} |")
    return "\n".join(rows)


# --- the run -------------------------------------------------------------------------------------


class Runner:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.started = time.monotonic()
        self.deadline_at = self.started + settings.deadline_s
        self.outcomes: dict[str, Outcome] = {}
        self.sites: list[Path] = []
        self.probe: dict[str, Any] = {}
        self.bundle_info: dict[str, Any] = {}
        self.wheels_info: dict[str, Any] = {}
        self.logs = settings.work / "logs"
        self.dry_checks: dict[str, str] = {}

    # environment for the steps: the installed bundle and wheels first, then the working tree
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TSGPU_REQUIRE_DALI", None)  # here a missing library is a skip with its reason
        path = [str(p) for p in self.sites] + [str(ROOT)]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                   TORCHINDUCTOR_CACHE_DIR=str(self.s.work / "inductor-cache"))
        return env

    def pip_env(self) -> dict[str, str]:
        """The steps' environment without any pip configuration: --no-index with the bundle's or the
        carried wheels only, never a find-links folder or constraint that a host's pip config adds."""
        env = {k: v for k, v in self.env().items() if not k.startswith("PIP_")}
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
        return env

    def left(self) -> float:
        return self.deadline_at - time.monotonic() - RESERVE_S

    def prepare(self) -> None:
        work = self.s.work
        if work.exists():
            if not (work / WORK_MARK).exists():
                raise SystemExit(f"WORK={work} exists and was not made by this runner: choose another WORK")
            shutil.rmtree(work)
        self.logs.mkdir(parents=True)
        (work / WORK_MARK).write_text("scratch folder of benchmarks/gpu_check.py\n")
        self.s.out.mkdir(parents=True, exist_ok=True)
        for name in ("summary.txt", "result.json", "result.md", "junit.xml", "logs.tar.gz", "fuzz-findings.tar.gz"):
            (self.s.out / name).unlink(missing_ok=True)

    def run(self) -> int:
        self.prepare()
        print(f"gpu_check: MODE={self.s.mode}{' DRY=1' if self.s.dry else ''} DEADLINE={self.s.deadline_s:.0f}s "
              f"OUT={self.s.out}", flush=True)
        for step in plan(self.s):
            outcome = self.run_step(step)
            self.outcomes[step.name] = outcome
            line = f"  {outcome.name:<15} {outcome.status:<8} {outcome.seconds:6.1f} s"
            print(line + (f"  ({outcome.reason})" if outcome.reason else ""), flush=True)
        return self.finish()

    def skip_reason(self, step: Step) -> str | None:
        for before in step.after:
            done = self.outcomes.get(before)
            if done is not None and done.status != "passed":
                return f"needs step {before}, which {'was skipped' if done.status == 'skipped' else 'failed'}"
        if step.gpu and not self.cuda_available():
            return f"CUDA not available: {self.cuda_reason()}"
        if self.left() < step.need_s:
            return (f"deadline: {max(0.0, self.left()):.0f} s left before DEADLINE={self.s.deadline_s:.0f} s "
                    f"(less {RESERVE_S} s for the results), the step needs at least {step.need_s:.0f} s")
        return None

    def cuda_available(self) -> bool:
        return bool(self.probe.get("cuda", {}).get("available"))

    def cuda_reason(self) -> str:
        if not self.probe:
            return "the probe did not run"
        return self.probe.get("cuda", {}).get("reason") or "unknown"

    def run_step(self, step: Step) -> Outcome:
        outcome = Outcome(step.name, step.what, "skipped", limit_s=step.limit_s,
                          command=" ".join(step.argv) if step.argv else None)
        reason = self.skip_reason(step)
        if reason:
            outcome.reason = reason
            if step.gpu and self.s.dry and reason.startswith("CUDA not available"):
                self.dry_check(step, outcome)
            return outcome
        if step.gpu and self.s.dry:  # a dry run on a GPU host still runs nothing on the GPU
            outcome.reason = "DRY=1: command line checked, not run"
            self.dry_check(step, outcome)
            return outcome
        limit = min(step.limit_s, self.left())
        outcome.limit_s = round(limit, 1)
        log = self.logs / f"{step.name}.log"
        outcome.log = f"logs/{log.name}"
        started = time.monotonic()
        try:
            if step.kind == "setup":
                getattr(self, f"setup_{step.name}")(outcome, log, limit)
            else:
                argv = list(step.argv or [])
                if step.kind == "pytest" and self.probe.get("versions", {}).get("pytest_timeout"):
                    argv.append(f"--timeout={self.s.test_timeout_s}")
                outcome.command = " ".join(argv)
                code, timed_out = run_command(argv, log, limit, self.env())
                outcome.exit_code = code
                outcome.status = "timeout" if timed_out else ("passed" if code == 0 else "failed")
                if timed_out:
                    outcome.reason = f"killed at its limit of {limit:.0f} s"
        except StepFailed as exc:
            outcome.status, outcome.reason = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a harness error is this step's failure, not the run's end
            outcome.status, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
        outcome.seconds = round(time.monotonic() - started, 1)
        self.after_step(step, outcome, log)
        return outcome

    def after_step(self, step: Step, outcome: Outcome, log: Path) -> None:
        if step.kind == "probe" and outcome.status == "passed":
            try:
                self.probe = json.loads((self.s.work / "probe.json").read_text())
            except (OSError, ValueError) as exc:
                outcome.status, outcome.reason = "failed", f"no probe result ({exc})"
                return
            if not self.cuda_available() and not self.s.dry:
                outcome.status = "failed"
                outcome.reason = (f"no CUDA here ({self.cuda_reason()}): this is not a GPU host; "
                                  f"DRY=1 checks the harness on a CPU-only host")
        elif step.kind == "pytest":
            outcome.tests = read_junit(self.s.out / "junit.xml")
            counts = outcome.tests
            outcome.highlights = [f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                                  f"{counts['skipped']} skipped, {counts['collection_errors']} collection errors"]
            if counts["collection_errors"] and outcome.status == "passed":
                outcome.status = "failed"
        elif step.kind == "fuzz":
            outcome.highlights = [line for line in tail(log, 40) if line.startswith(("  ", "findings", "fuzzing"))
                                  or "inputs in" in line][-20:]
        elif step.argv:
            outcome.highlights = [line for line in tail(log, 80) if line.startswith(("|", "#", "(", "GPU target",
                                  "target:", "conv ceiling", "not measured", "rss:", "allocated:", "reserved:",
                                  "device_used:")) or "requests (" in line]
        if outcome.status in ("failed", "timeout") and not outcome.highlights:
            outcome.highlights = tail(log, 15)

    # -- dry checks: each GPU step's command line, parsed by its own script, without running it --
    def dry_check(self, step: Step, outcome: Outcome) -> None:
        """Dry runs: the step's script parses the step's arguments (all GPU steps in one process, the
        first time; its time is counted to the first GPU step)."""
        started = time.monotonic()
        if not self.dry_checks:
            self.dry_checks = self.check_commands([s for s in plan(self.s) if s.gpu and s.argv])
        outcome.seconds = round(time.monotonic() - started, 1)
        outcome.dry_check = self.dry_checks.get(step.name, "error: not checked")
        if outcome.dry_check.startswith("error"):
            outcome.status = "failed"

    def check_commands(self, steps: list[Step]) -> dict[str, str]:
        if self.left() < 10:
            return {s.name: "not checked: deadline" for s in steps}
        spec = self.s.work / "argcheck.json"
        spec.write_text(json.dumps({s.name: s.argv[1:] for s in steps if s.argv}))
        log = self.logs / "argcheck.log"
        code, _ = run_command([self.s.python, "-m", "benchmarks.gpu_check", "argcheck", str(spec)], log,
                              min(120, self.left()), self.env())
        try:
            return json.loads((self.s.work / "argcheck.result.json").read_text())
        except (OSError, ValueError):
            return {s.name: f"error: the argument check exited {code} (logs/argcheck.log)" for s in steps}

    # -- setup steps --
    def setup_bundle(self, outcome: Outcome, log: Path, limit: float) -> None:
        tar, digest_file = self.s.bundle / BUNDLE_NAME, self.s.bundle / f"{BUNDLE_NAME}.sha256"
        if not tar.exists() or not digest_file.exists():
            raise StepFailed(f"no bundle at {tar} (+ .sha256): run `make gpu-bundle` here and carry gpu-bundle "
                             f"(device tool: carry=[\"gpu-bundle\"])")
        expected = digest_file.read_text().split()[0]
        actual = sha256_file(tar)
        self.bundle_info = {"file": str(tar), "bytes": tar.stat().st_size, "sha256": actual}
        if actual != expected:
            raise StepFailed(f"{tar.name}: sha256 {actual} but {digest_file.name} says {expected}: the bundle "
                             f"changed on the way; rebuild it with `make gpu-bundle` and carry it again")
        if self.s.bundle_sha256 and actual != self.s.bundle_sha256:
            raise StepFailed(f"{tar.name}: sha256 {actual} but BUNDLE_SHA256={self.s.bundle_sha256}: "
                             f"not the bundle you meant to send")
        unpacked = self.s.work / "bundle"
        with tarfile.open(tar) as archive:
            _safe_extract(archive, unpacked)
        manifest = json.loads((unpacked / "MANIFEST.json").read_text())
        for wheel in manifest["wheels"]:
            got = sha256_file(unpacked / "wheels" / wheel["file"])
            if got != wheel["sha256"]:
                raise StepFailed(f"{wheel['file']}: sha256 {got}, the manifest says {wheel['sha256']}")
        self.bundle_info.update(for_python=manifest.get("for_python"), wheels=[w["file"] for w in manifest["wheels"]])
        site = self.s.work / "site"
        wanted = list(manifest["install"])
        present = self._has_modules({"pytest_timeout": "pytest-timeout"}, manifest.get("install_if_missing", []))
        wanted += [dist for dist in manifest.get("install_if_missing", []) if dist not in present]
        self.bundle_info["host_has"] = sorted(present)
        code, timed_out = run_command(
            [self.s.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check",
             "--target", str(site), "--find-links", str(unpacked / "wheels"), *wanted], log, limit, self.pip_env())
        outcome.exit_code = code
        if code != 0:
            raise StepFailed(f"pip install from the bundle {'timed out' if timed_out else f'exited {code}'}: "
                             + " / ".join(tail(log, 3)))
        self.sites.insert(0, site)
        self.bundle_info["installed"] = wanted
        check = ("import importlib.metadata as m, ts, model_archiver, pycocotools.mask, sys; "
                 "print(ts.__file__); print(m.version('torchserve'), m.version('torch-model-archiver'), "
                 "m.version('pycocotools'))")
        done = subprocess.run([self.s.python, "-c", check], cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=max(5, min(60, self.left())))
        with log.open("a") as f:
            f.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise StepFailed("the installed bundle does not import: " + " / ".join(done.stderr.strip().splitlines()[-2:]))
        origin = done.stdout.splitlines()[0]
        if not origin.startswith(str(site)):
            raise StepFailed(f"`ts` imports from {origin}, not from the bundle's {site}")
        outcome.status = "passed"
        outcome.highlights = [f"bundle {actual[:16]}... ({tar.stat().st_size / 2**20:.2f} MiB) installed into {site}: "
                              f"{', '.join(wanted)}" + (f"; host's own: {', '.join(sorted(present))}" if present else "")]

    def _has_modules(self, modules: dict[str, str], dists: list[str]) -> set[str]:
        """The distributions in `dists` the host's Python already imports (module -> dist in `modules`)."""
        have = set()
        for module, dist in modules.items():
            if dist in dists:
                done = subprocess.run([self.s.python, "-c", f"import {module}"], capture_output=True, timeout=60)
                if done.returncode == 0:
                    have.add(dist)
        return have

    def setup_wheels(self, outcome: Outcome, log: Path, limit: float) -> None:
        parts = sorted(self.s.wheels.glob("p*/part"))
        if not parts:
            if self.s.wheels_site.is_dir() and any(self.s.wheels_site.iterdir()):
                share_nvidia_namespace(self.s.wheels_site)
                self.sites.append(self.s.wheels_site)
                self.wheels_info = {"site": str(self.s.wheels_site), "from": "installed earlier"}
                outcome.status = "passed"
                outcome.highlights = [f"using {self.s.wheels_site}, installed earlier by device-wheels' own command"]
                return
            raise StepFailed(f"MODE={self.s.mode} needs its wheels: no parts in {self.s.wheels}/p*/part and no "
                             f"{self.s.wheels_site}; see docs/gpu-verification.md for the device-wheels sequence")
        if not self.s.wheels_sha256:
            raise StepFailed(f"{len(parts)} parts in {self.s.wheels} but WHEELS_SHA256 is not set: pass the joined "
                             f"sha256 that ../shared/tools/device-wheels printed")
        joined = self.s.work / "devwheels.tar"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in parts:
                data = part.read_bytes()
                digest.update(data)
                out.write(data)
        actual = digest.hexdigest()
        self.wheels_info = {"parts": len(parts), "bytes": joined.stat().st_size, "sha256": actual}
        if actual != self.s.wheels_sha256:
            raise StepFailed(f"the {len(parts)} joined parts have sha256 {actual}, WHEELS_SHA256 says "
                             f"{self.s.wheels_sha256}: a part is missing or stale (were all runs back to back?)")
        unpacked = self.s.work / "devwheels"
        with tarfile.open(joined) as archive:
            _safe_extract(archive, unpacked)
        joined.unlink()
        wheels = sorted((unpacked / "wheels").glob("*.whl"))
        site = self.s.work / "wheels-site"
        code, timed_out = run_command(
            [self.s.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check",
             "--target", str(site), *map(str, wheels)], log, limit, self.pip_env())
        outcome.exit_code = code
        if code != 0:
            raise StepFailed(f"pip install of the carried wheels {'timed out' if timed_out else f'exited {code}'}: "
                             + " / ".join(tail(log, 3)))
        share_nvidia_namespace(site)
        self.sites.append(site)
        self.wheels_info.update(site=str(site), wheels=[w.name for w in wheels])
        outcome.status = "passed"
        outcome.highlights = [f"{len(parts)} parts, {joined.name} sha256 {actual[:16]}..., {len(wheels)} wheels "
                              f"installed into {site}"]

    # -- results --
    def finish(self) -> int:
        out = self.s.out
        failed = [o.name for o in self.outcomes.values() if o.status in ("failed", "timeout")]
        code = 1 if failed else 0
        date = time.strftime("%Y-%m-%d", time.gmtime())
        pytest_outcome = self.outcomes.get("pytest-gpu")
        cases = (pytest_outcome.tests or {}).get("cases", {}) if pytest_outcome else {}
        findings = self.s.work / "fuzz-findings"
        if findings.is_dir() and any(findings.iterdir()):
            with tarfile.open(out / "fuzz-findings.tar.gz", "w:gz") as archive:
                archive.add(findings, arcname="fuzz-findings")
        result = {
            "schema": 1,
            "mode": self.s.mode,
            "dry": self.s.dry,
            "date": date,
            "deadline_s": self.s.deadline_s,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "exit_code": code,
            "failed_steps": failed,
            "host": {"python": self.probe.get("python") or platform.python_version(), "machine": platform.machine()},
            "versions": self.probe.get("versions", {}),
            "gpu": self.probe.get("gpu", {}),
            "cuda": self.probe.get("cuda", {}),
            "backends": self.probe.get("backends", {}),
            "bundle": self.bundle_info,
            "wheels": self.wheels_info,
            "steps": [_public(o) for o in self.outcomes.values()],
            "tests": {k: v for k, v in (pytest_outcome.tests or {}).items() if k != "cases"} if pytest_outcome else {},
            "paths": [{"path": p.what, "mode": p.mode, "state": path_state(p, cases, self.outcomes, date)}
                      for p in PATHS if p.mode in (self.s.mode, "" if self.s.mode == "core" else self.s.mode)],
        }
        summary = self.summary(result)
        (out / "summary.txt").write_text(summary)
        (out / "result.md").write_text(self.markdown(result, cases, date))
        result["outputs"] = sorted(p.name for p in out.iterdir()) + ["result.json", "logs.tar.gz"]
        result["outputs"] = sorted(set(result["outputs"]))
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        (self.logs / "result.json").write_text(json.dumps(result, indent=1, default=str))
        for extra in ("probe.json",):
            if (self.s.work / extra).exists():
                shutil.copy(self.s.work / extra, self.logs / extra)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
            archive.add(self.logs, arcname="logs")
        files = [p for p in out.iterdir()]
        if len(files) > MAX_OUTPUT_FILES:
            print(f"WARNING: {len(files)} files in {out}, more than the {MAX_OUTPUT_FILES} the device tool brings back")
        print(summary, flush=True)
        return code

    def summary(self, result: dict[str, Any]) -> str:
        v, gpu = result["versions"], result["gpu"]
        lines = [
            f"gpu_check {result['date']}: MODE={result['mode']}{' DRY=1' if result['dry'] else ''}, "
            f"exit {result['exit_code']} after {result['elapsed_s']:.0f} s of DEADLINE={result['deadline_s']:.0f} s",
            f"GPU: {gpu.get('name') or 'none'}; driver {gpu.get('driver') or '-'}; torch {v.get('torch', '-')} "
            f"(CUDA {v.get('torch_cuda') or '-'}), torchvision {v.get('torchvision', '-')}, Python {result['host']['python']}",
            "steps:",
        ]
        for step in result["steps"]:
            lines.append(f"  {step['name']:<15} {step['status']:<8} {step['seconds']:6.1f} s"
                         + (f"  {step['reason']}" if step.get("reason") else "")
                         + (f"  [dry check: {step['dry_check']}]" if step.get("dry_check") else ""))
            lines += [f"      {h}" for h in step.get("highlights", [])[:40]]
        tests = result["tests"]
        if tests:
            lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                         f"{tests['skipped']} skipped, {tests['collection_errors']} collection errors")
            lines += [f"  FAILED {f}" for f in tests["failures"]]
            lines += [f"  skipped x{n}: {reason}" for reason, n in sorted(tests["skip_reasons"].items())]
        lines.append("backends: " + "; ".join(f"{name} {'yes' if b.get('available') else 'no'}"
                                               + (f" ({b['reason']})" if b.get("reason") else "")
                                               for name, b in result["backends"].items()))
        lines.append("GPU paths:")
        lines += [f"  [{p['state']}] {p['path']}" for p in result["paths"]]
        return "\n".join(lines) + "\n"

    def markdown(self, result: dict[str, Any], cases: dict[str, str], date: str) -> str:
        v, gpu = result["versions"], result["gpu"]
        env = " ".join(f"{k}={os.environ[k]}" for k in ("DRY", "DEADLINE") if os.environ.get(k))
        lines = [
            f"### {date}, MODE={result['mode']}{' (DRY=1, no GPU)' if result['dry'] else ''}: "
            f"{gpu.get('name') or 'no GPU'}, exit {result['exit_code']}",
            "",
            f"`MODE={result['mode']} {env + ' ' if env else ''}bash benchmarks/gpu_check.sh`: "
            f"{result['elapsed_s']:.0f} s of DEADLINE={result['deadline_s']:.0f} s. Driver {gpu.get('driver') or '-'}, "
            f"torch {v.get('torch', '-')} (CUDA {v.get('torch_cuda') or '-'}, cuDNN {v.get('cudnn') or '-'}), "
            f"torchvision {v.get('torchvision', '-')}, Python {result['host']['python']}. Libraries: "
            + ", ".join(f"{k} {v[k]}" for k in ("nvidia.dali", "cvcuda", "nvidia.nvimgcodec", "torch_tensorrt",
                                                  "cudf", "cupy", "torchserve", "pycocotools") if v.get(k)) + ".",
            "",
            "| step | state | s | tests passed / failed / skipped | note |",
            "|---|---|---:|---|---|",
        ]
        for step in result["steps"]:
            t = step.get("tests")
            counts = f"{t['passed']} / {t['failed'] + t['errors']} / {t['skipped']}" if t else ""
            note = (step.get("reason") or "") + (f" (dry check: {step['dry_check']})" if step.get("dry_check") else "")
            lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.0f} | {counts} | {note} |")
        lines += ["", "Backends: " + "; ".join(
            f"{name} {'available' if b.get('available') else 'unavailable'}"
            + (f" ({b['reason']})" if b.get("reason") else "") for name, b in result["backends"].items()) + ".", ""]
        lines.append(paths_table(cases, self.outcomes, date, mode=result["mode"]))
        tests = result["tests"]
        if tests and (tests["failures"] or tests["skip_reasons"]):
            lines += ["", "Test failures and skip reasons:", ""]
            lines += [f"- FAILED `{f}`" for f in tests["failures"]]
            lines += [f"- skipped x{n}: {reason}" for reason, n in sorted(tests["skip_reasons"].items())]
        for step in result["steps"]:
            if step.get("highlights") and step["status"] != "skipped" and step["name"] not in ("pytest-gpu",):
                lines += ["", f"`{step['name']}`:", "", *[h if h.startswith("|") else h + "  " for h in step["highlights"]]]
        return "\n".join(lines) + "\n"


class StepFailed(Exception):
    """A step's failure, with the message that says why and what to do."""


def _public(o: Outcome) -> dict[str, Any]:
    data = {k: v for k, v in o.__dict__.items() if v not in (None, [], {})}
    if o.tests is not None:
        data["tests"] = {k: v for k, v in o.tests.items() if k != "cases"}
    data.setdefault("seconds", 0.0)
    return data


def share_nvidia_namespace(site: Path) -> None:
    """Let `nvidia` span the carried wheels' folder and the host's site-packages.

    pip --target leaves nvImageCodec's nvidia/__init__.py (a licence header) in the target. First on
    the path, that regular package hides the host's nvidia.* (torch's CUDA 13 libraries in nvidia/cu13);
    after the host's, a host nvidia/__init__.py would hide ours (nvidia.dali). A pkgutil-style
    __init__ gives the package every nvidia/ folder on the path, ours first."""
    package = site / "nvidia"
    if package.is_dir():
        (package / "__init__.py").write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
        shutil.rmtree(package / "__pycache__", ignore_errors=True)


def _safe_extract(archive: tarfile.TarFile, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if not str(target).startswith(str(dest.resolve())) or not (member.isfile() or member.isdir()):
            raise StepFailed(f"refusing archive member {member.name!r}")
    try:
        archive.extractall(dest, filter="data")
    except TypeError:  # a Python without extraction filters; the members were checked above
        archive.extractall(dest)


# --- probe (runs in a subprocess, with the bundle on the path) --------------------------------------


def cmd_probe(argv: list[str]) -> int:
    out = Path(argv[0])
    import importlib
    import importlib.metadata as metadata

    result: dict[str, Any] = {"python": platform.python_version(), "versions": {}, "origins": {}, "gpu": {},
                              "cuda": {}, "backends": {}}
    versions = result["versions"]
    import torch

    versions.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        versions["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        versions["cudnn"] = None
    available = torch.cuda.is_available()
    reason = None
    if not available:
        try:
            torch.cuda.init()
            reason = f"torch.cuda.is_available() is False ({torch.cuda.device_count()} devices)"
        except Exception as exc:  # noqa: BLE001
            reason = re.split(r"(?<=\.)\s", str(exc).strip())[0][:200]  # its first sentence
        reason = f"{reason} (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
    result["cuda"] = {"available": available, "reason": reason, "devices": torch.cuda.device_count() if available else 0}
    if available:
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                         "memory_gib": round(props.total_memory / 2**30, 1)}
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            name, driver, memory = (x.strip() for x in done.stdout.splitlines()[0].split(",")[:3])
            result["gpu"].update(driver=driver, smi_name=name, smi_memory=memory)
    modules = {"torchvision": "torchvision", "nvidia.dali": "nvidia-dali-cuda130", "cvcuda": "cvcuda-cu13",
               "nvidia.nvimgcodec": "nvidia-nvimgcodec-cu13", "torch_tensorrt": "torch-tensorrt", "tensorrt": "tensorrt",
               "cudf": "cudf-cu13", "cupy": "cupy-cuda13x", "ts": "torchserve", "model_archiver": "torch-model-archiver",
               "pycocotools": "pycocotools", "pytest": "pytest", "pytest_timeout": "pytest-timeout", "numpy": "numpy",
               "PIL": "pillow"}
    for module, dist in modules.items():
        key = {"ts": "torchserve", "model_archiver": "torch_model_archiver"}.get(module, module)
        try:
            imported = importlib.import_module(module)
            version = getattr(imported, "__version__", None)
            if not isinstance(version, str):
                try:
                    version = metadata.version(dist)
                except metadata.PackageNotFoundError:
                    version = "?"
            versions[key] = version
            result["origins"][key] = str(getattr(imported, "__file__", "") or "")
        except Exception as exc:  # noqa: BLE001 - absent or broken: both are worth reporting
            versions[key] = None
            result["origins"][key] = f"not importable: {type(exc).__name__}: {str(exc)[:200]}"
    from handlers.preprocess import BACKEND_NAMES, backend_module

    for name in BACKEND_NAMES:
        try:
            why = backend_module(name).availability(torch.device("cuda"))
            if why is None and not available:
                why = "CUDA not available"
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}"
        result["backends"][name] = {"available": why is None, "reason": why}
    from handlers.extras import install_hint

    trt = None if versions.get("torch_tensorrt") else (
        f"torch_tensorrt {result['origins'].get('torch_tensorrt')}; {install_hint('trt')}")
    result["backends"]["tensorrt"] = {"available": trt is None and available,
                                      "reason": trt or (None if available else "CUDA not available")}
    try:
        from torch._inductor.package import load_package  # noqa: F401

        aoti = None if available else "CUDA not available"
    except Exception as exc:  # noqa: BLE001
        aoti = f"torch._inductor.package is not importable ({exc})"
    result["backends"]["aoti"] = {"available": aoti is None, "reason": aoti}
    result["backends"]["cudf"] = {"available": bool(versions.get("cudf")) and available,
                                  "reason": None if versions.get("cudf") and available else
                                  (f"cudf not importable; {install_hint('cudf')}" if not versions.get("cudf")
                                   else "CUDA not available")}
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


# --- argcheck (dry runs): each script's argparse accepts the step's arguments -------------------------


class _ArgsAccepted(Exception):
    pass


def cmd_argcheck(argv: list[str]) -> int:
    import argparse as ap
    import runpy

    spec = json.loads(Path(argv[0]).read_text())
    original = ap.ArgumentParser.parse_args
    results: dict[str, str] = {}

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _ArgsAccepted

    ap.ArgumentParser.parse_args = parse_and_stop  # type: ignore[method-assign]
    for name, args in spec.items():
        # a step runs a module (`-m benchmarks.NAME ...`, from the repository root) or a script path
        module = args[1] if args[0] == "-m" else None
        script, *rest = args[1:] if module else args
        sys.argv = [script, *rest]
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
            results[name] = "error: the script ran to the end without parsing arguments"
        except _ArgsAccepted:
            results[name] = "arguments accepted"
        except SystemExit as exc:
            results[name] = f"error: {Path(script).name} rejected its arguments (exit {exc.code})"
        except Exception as exc:  # noqa: BLE001
            results[name] = f"error: {type(exc).__name__}: {exc}"
        print(f"{name}: {results[name]}", flush=True)
    Path(argv[0]).with_suffix(".result.json").write_text(json.dumps(results))
    return 0


def cmd_paths(argv: list[str]) -> int:
    print(paths_table())
    return 0


def cmd_run(argv: list[str]) -> int:
    if argv:
        raise SystemExit(f"gpu_check: unexpected arguments {argv}; settings come from the environment "
                         f"(MODE, OUT, DEADLINE, DRY, ...; see the docstring)")
    return Runner(Settings.from_env(dict(os.environ))).run()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "bundle", "probe", "argcheck", "paths") else "run"
    return {"run": cmd_run, "bundle": cmd_bundle, "probe": cmd_probe, "argcheck": cmd_argcheck,
            "paths": cmd_paths}[command](argv)


if __name__ == "__main__":
    sys.exit(main())
