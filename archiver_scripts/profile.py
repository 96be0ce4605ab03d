"""`tsgpu profile`: where one worker's time goes, stage by stage, and what to change.

    tsgpu profile ARCHIVE.mar --images DIR [--batch-sizes 1,4,8] [--micro-batch 0] [--seconds N] [--json]

The archive is unpacked to a temporary directory and its handler loaded in this process the way a
TorchServe worker loads it (ts/model_loader.py + ts/service.py): the archive's directory first on
sys.path, so its entry file (`tsgpu_entry.py`) imports the archive's own copy of `handlers`; the
manifest from MAR-INF/MANIFEST.json; `model-config.yaml` (the manifest's configFile) as the
context's `model_yaml_config`; the GPU 0 when CUDA is available. The context is our FakeContext, so
the handler's own per-stage metrics (handlers/stages.py) are recorded instead of logged; the profile
is built from those, batch after batch, at each batch size. Nothing is served.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from handlers.runtime import available_cpus
from handlers.stages import DECODE, DEVICE_IDLE, FORWARD, OVERLAP, STAGES, UPLOAD
from handlers.testing import FakeContext, raw_request, run_handler

NOT_AVAILABLE = "not available in this version"
OTHER = "other"  # handler time in no stage: responses (JSON), bookkeeping
_SAME_THROUGHPUT = 0.05  # batch sizes within 5% of the best count as equally fast (take the smaller)


class ProfileError(ValueError):
    """A bad `tsgpu profile` argument or archive; the message names it and the fix."""


class HandlerFailed(RuntimeError):
    """The archive's handler failed to load. Its own error classes come from the archive's copy of
    `handlers`, not this process's, so they are wrapped here under one name the CLI can catch."""


@dataclass
class Run:
    """One batch size's measurement."""

    batch_size: int
    micro_batch: int
    batches: int
    images: int
    errors: int
    wall_seconds: float
    images_per_second: float
    ms_per_image: dict[str, float]
    device_idle_ms_per_batch: float | None
    overlap_percent: float
    cpu_cores_busy: float
    bounding_stage: str


@dataclass
class Advice:
    value: Any
    figure: str


@dataclass
class Profile:
    archive: str
    model: str
    device: str
    handler: dict[str, Any]
    host_cpus: int
    images: int
    runs: list[Run]
    bottleneck: dict[str, Any] = field(default_factory=dict)
    recommendations: dict[str, Advice] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- loading the archive like a worker ----------------------------------------------------------


def _is_ours(module_name: str, entry: str) -> bool:
    return module_name == entry or module_name == "handlers" or module_name.startswith("handlers.")


@contextmanager
def archive_imports(model_dir: Path, entry: str) -> Iterator[None]:
    """The archive's directory first on sys.path and its own `handlers` package importable.

    The `handlers` already imported by this process are set aside (a worker has none imported) and
    put back afterwards, so the caller's code keeps its own modules."""
    saved = {name: mod for name, mod in sys.modules.items() if _is_ours(name, entry)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(model_dir))
    try:
        yield
    finally:
        for name in [n for n in sys.modules if _is_ours(n, entry)]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path.remove(str(model_dir))


def unpack(mar: Path, into: Path) -> dict[str, Any]:
    """Extract the archive; return its manifest."""
    if not mar.is_file():
        raise ProfileError(f"{mar}: no such archive (build one with `tsgpu archive` or `tsgpu demo`)")
    try:
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(into)
    except zipfile.BadZipFile as exc:
        raise ProfileError(f"{mar}: not a .mar (zip) archive: {exc}") from None
    manifest_file = into / "MAR-INF" / "MANIFEST.json"
    if not manifest_file.is_file():
        raise ProfileError(f"{mar}: no MAR-INF/MANIFEST.json; rebuild it with `tsgpu archive`")
    return json.loads(manifest_file.read_text())


def load_handler(model_dir: Path, manifest: dict[str, Any], batch_size: int) -> tuple[Any, FakeContext]:
    """Import the entry module and initialize its one handler class, as TsModelLoader.load does.
    Call inside `archive_imports(model_dir, entry)`."""
    from ts.utils.util import get_yaml_config, list_classes_from_module

    model = manifest.get("model", {})
    entry = Path(model.get("handler", "")).stem
    module = importlib.import_module(entry)
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        raise ProfileError(f"{model.get('handler')}: expected one handler class, found {len(classes)}")
    yaml_config = get_yaml_config(model_dir / model["configFile"]) if model.get("configFile") else {}
    yaml_config = {**(yaml_config or {}), "batchSize": batch_size}
    context = FakeContext(
        model_dir, model_yaml_config=yaml_config, batch_size=batch_size,
        gpu_id=0 if torch.cuda.is_available() else None, model_name=model.get("modelName", "model"),
        manifest=manifest,
    )
    handler = classes[0]()
    handler.initialize(context)
    return handler, context


# -- measuring -------------------------------------------------------------------------------------


def read_images(directory: Path) -> list[bytes]:
    if not directory.is_dir():
        raise ProfileError(f"--images {directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ProfileError(f"--images {directory}: no files in it (put a few JPEG/PNG images there)")
    return [p.read_bytes() for p in files]


def measure(handler: Any, context: FakeContext, images: list[bytes], batch_size: int, seconds: float) -> Run:
    """Run batches of `batch_size` until `seconds` have passed (at least 2 after one warm batch)."""
    cursor = 0

    def next_batch() -> list:
        nonlocal cursor
        batch = [raw_request(images[(cursor + k) % len(images)]) for k in range(batch_size)]
        cursor += batch_size
        return batch

    run_handler(handler, context, next_batch())  # warm: first call at this shape
    start_calls = len(context.metrics.calls)
    batches = images_sent = errors = 0
    wall = 0.0
    cpu0, started = time.process_time(), time.perf_counter()
    while batches < 2 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        responses = run_handler(handler, context, next_batch())
        wall += time.perf_counter() - t0
        batches += 1
        images_sent += batch_size
        errors += sum(r.status != 200 for r in responses)
    cores_busy = (time.process_time() - cpu0) / max(time.perf_counter() - started, 1e-9)
    return _summarise(context.metrics.calls[start_calls:], batch_size, batches, images_sent, errors, wall, cores_busy)


def _summarise(calls: list, batch_size: int, batches: int, images: int, errors: int, wall: float,
               cores_busy: float) -> Run:
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for call in calls:
        totals[call.name] = totals.get(call.name, 0.0) + call.value
        counts[call.name] = counts.get(call.name, 0) + 1
    per_image = {name: round(totals.get(name, 0.0) / images, 4) for name in STAGES}
    staged = sum(totals.get(name, 0.0) for name in STAGES)
    per_image[OTHER] = round(max(0.0, totals.get("HandlerTime", 0.0) - staged) / images, 4)
    idle = totals[DEVICE_IDLE] / counts[DEVICE_IDLE] if counts.get(DEVICE_IDLE) else None
    overlap = totals.get(OVERLAP, 0.0) / counts[OVERLAP] if counts.get(OVERLAP) else 0.0
    ok = images - errors
    return Run(
        batch_size=batch_size, micro_batch=0, batches=batches, images=images, errors=errors,
        wall_seconds=round(wall, 4), images_per_second=round(ok / wall, 2) if wall > 0 else 0.0,
        ms_per_image=per_image, device_idle_ms_per_batch=None if idle is None else round(idle, 3),
        overlap_percent=round(overlap, 2), cpu_cores_busy=round(cores_busy, 2),
        bounding_stage=max(STAGES, key=lambda n: per_image[n]),
    )


# -- reading the runs ------------------------------------------------------------------------------


def runs_on(stage: str, device: str, backend: str) -> str:
    """Which processor a stage keeps busy: the device's for forward/upload (and GPU decoders)."""
    if device.startswith("cuda") and (stage in (FORWARD, UPLOAD) or (stage == DECODE and backend != "cpu")):
        return "gpu"
    return "cpu"


def best_run(runs: list[Run]) -> Run:
    """The fastest batch size; the smallest one within 5% of the fastest (same throughput, less latency)."""
    top = max(r.images_per_second for r in runs)
    return min((r for r in runs if r.images_per_second >= top * (1 - _SAME_THROUGHPUT)), key=lambda r: r.batch_size)


def bottleneck(run: Run, device: str, backend: str) -> dict[str, Any]:
    stage = run.bounding_stage
    total = sum(run.ms_per_image.values())
    return {
        "stage": stage, "batch_size": run.batch_size, "ms_per_image": run.ms_per_image[stage],
        "share_of_handler_time": round(run.ms_per_image[stage] / total, 3) if total else 0.0,
        "runs_on": runs_on(stage, device, backend),
    }


def recommend(runs: list[Run], device: str, backend: str, backends: dict[str, str | None],
              auto_backend: str, host_cpus: int, archive_batch: int) -> dict[str, Advice]:
    best = best_run(runs)
    first = min(runs, key=lambda r: r.batch_size)
    neck = bottleneck(best, device, backend)
    stage_ms = {n: best.ms_per_image[n] for n in STAGES}
    total_ms = sum(stage_ms.values()) + best.ms_per_image[OTHER]
    speedup = total_ms / neck["ms_per_image"] if neck["ms_per_image"] > 0 else 1.0
    advice = {
        "batchSize": Advice(best.batch_size, (
            f"{best.images_per_second:.1f} img/s at batch {best.batch_size} vs {first.images_per_second:.1f} at "
            f"{first.batch_size} (archive has batchSize {archive_batch}; smallest within 5% of the fastest)")),
        "micro_batch": Advice(NOT_AVAILABLE, (
            f"the in-worker pipeline is not built yet; fully overlapped, the stages would be bounded by "
            f"{neck['stage']} at {neck['ms_per_image']:.2f} of {total_ms:.2f} ms/img: at most x{speedup:.2f} "
            f"the measured {best.images_per_second:.1f} img/s")),
        "decode_processes": Advice(NOT_AVAILABLE, (
            f"decode is {stage_ms[DECODE]:.2f} ms/img ({stage_ms[DECODE] / total_ms:.0%} of the handler's time) "
            f"on the {backend} backend; one worker keeps {best.cpu_cores_busy:.2f} of {host_cpus} CPUs busy")),
        "workers": _workers(best, neck, host_cpus, total_ms),
        "preprocess_backend": _backend_advice(backend, backends, auto_backend, stage_ms[DECODE], total_ms, device),
    }
    return advice


def _workers(best: Run, neck: dict[str, Any], host_cpus: int, total_ms: float) -> Advice:
    if neck["runs_on"] == "gpu":
        return Advice(1, (
            f"the bounding stage {neck['stage']} runs on the GPU ({neck['ms_per_image']:.2f} of {total_ms:.2f} "
            f"ms/img): another worker adds a CUDA context and a model copy, not throughput"))
    busy = max(best.cpu_cores_busy, 0.05)
    workers = max(1, min(host_cpus, math.floor(host_cpus / busy + 0.25)))
    return Advice(workers, (
        f"the bounding stage {neck['stage']} runs on the CPU ({neck['ms_per_image']:.2f} of {total_ms:.2f} ms/img) "
        f"and one worker keeps {best.cpu_cores_busy:.2f} of {host_cpus} CPUs busy (CPU time / wall): "
        f"{host_cpus}/{best.cpu_cores_busy:.2f} -> {workers} worker(s), each with {max(1, host_cpus // workers)} "
        f"torch thread(s) (the handler divides the CPUs by minWorkers)"))


def _backend_advice(backend: str, backends: dict[str, str | None], auto_backend: str, decode_ms: float,
                    total_ms: float, device: str) -> Advice:
    usable = [name for name, why in backends.items() if why is None]
    figure = (f"decode {decode_ms:.2f} ms/img ({decode_ms / total_ms:.0%} of the handler's time) on {backend}; "
              f"usable on {device}: {', '.join(usable) or 'none'}; `auto` picks {auto_backend}")
    if auto_backend != backend:
        figure += f" (this archive pins {backend}: try handler.preprocess.backend: auto)"
    return Advice(auto_backend, figure)


# -- the command ---------------------------------------------------------------------------------


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ProfileError(f"--batch-sizes {text!r}: use comma-separated positive integers, e.g. 1,4,8") from None
    if not sizes or sizes[0] < 1:
        raise ProfileError(f"--batch-sizes {text!r}: use comma-separated positive integers, e.g. 1,4,8")
    return sizes


def profile(mar: Path, images_dir: Path, batch_sizes: list[int], micro_batch: int = 0,
            seconds: float = 3.0) -> Profile:
    if micro_batch != 0:
        raise ProfileError(
            f"--micro-batch {micro_batch}: handler.pipeline.micro_batch is {NOT_AVAILABLE} "
            f"(the in-worker pipeline is not built yet); profile with --micro-batch 0")
    images = read_images(images_dir)
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="tsgpu-profile-") as tmp:
        model_dir = Path(tmp)
        manifest = unpack(mar, model_dir)
        entry = Path(manifest.get("model", {}).get("handler", "")).stem
        try:
            with archive_imports(model_dir, entry):
                return _profile_loaded(mar, model_dir, manifest, images, batch_sizes, seconds)
        finally:
            torch.set_num_threads(threads_before)  # initialize sized torch's pool for a worker


def _profile_loaded(mar: Path, model_dir: Path, manifest: dict[str, Any], images: list[bytes],
                    batch_sizes: list[int], seconds: float) -> Profile:
    from handlers.preprocess import backend_module, resolve_backend  # the archive's copy

    yaml_config = {}
    if manifest.get("model", {}).get("configFile"):
        from ts.utils.util import get_yaml_config

        yaml_config = get_yaml_config(model_dir / manifest["model"]["configFile"]) or {}
    try:
        handler, context = load_handler(model_dir, manifest, max(batch_sizes))
    except ProfileError:
        raise
    except Exception as exc:
        raise HandlerFailed(f"loading {mar.name} failed: {type(exc).__name__}: {exc}") from exc
    try:
        try:
            runs = [measure(handler, context, images, bs, seconds) for bs in batch_sizes]
        except Exception as exc:
            raise HandlerFailed(f"running {mar.name}'s handler failed: {type(exc).__name__}: {exc}") from exc
        device = str(handler.device)
        backend = handler.preprocessor.name
        backends = {name: backend_module(name).availability(handler.device)
                    for name in ("cpu", "torchvision", "dali", "cvcuda")}
        auto = resolve_backend("auto", handler.device)
    finally:
        if handler.preprocessor is not None:
            handler.preprocessor.close()
    host_cpus = available_cpus()
    result = Profile(
        archive=str(mar), model=manifest.get("model", {}).get("modelName", ""), device=device,
        handler={"class": f"{type(handler).__mro__[1].__module__}.{type(handler).__mro__[1].__name__}",
                 "preprocess_backend": backend, "torch_threads": torch.get_num_threads(),
                 "archive_batch_size": int(yaml_config.get("batchSize", 1)), "backends": backends},
        host_cpus=host_cpus, images=len(images), runs=runs,
    )
    result.bottleneck = bottleneck(best_run(runs), device, backend)
    result.recommendations = recommend(runs, device, backend, backends, auto, host_cpus,
                                       result.handler["archive_batch_size"])
    return result


def format_profile(p: Profile) -> str:
    names = [*STAGES, OTHER]
    heads = ["read", "fetch", "decode", "upload", "forward", "postproc", "other"]
    lines = [
        f"tsgpu profile: {p.model} ({p.archive}) on {p.device}; preprocess {p.handler['preprocess_backend']}, "
        f"{p.handler['torch_threads']} torch thread(s), {p.images} image(s), host {p.host_cpus} CPU(s)",
        "",
        "time per image (ms) by stage; img/s = successful images per second of handle(); "
        "cores = CPU time / wall",
        f"{'batch':>5} " + " ".join(f"{h:>8}" for h in heads) + f" | {'img/s':>8} {'cores':>5} {'idle/b':>7} "
        f"{'errors':>6}  bounding",
    ]
    for r in p.runs:
        cells = " ".join(f"{r.ms_per_image[n]:8.3f}" if r.ms_per_image[n] else f"{'-':>8}" for n in names)
        idle = f"{r.device_idle_ms_per_batch:7.2f}" if r.device_idle_ms_per_batch is not None else f"{'-':>7}"
        lines.append(f"{r.batch_size:>5} {cells} | {r.images_per_second:8.1f} {r.cpu_cores_busy:5.2f} {idle} "
                     f"{r.errors:>6}  {r.bounding_stage}")
    b = p.bottleneck
    lines += [
        "",
        f"bottleneck: {b['stage']} - {b['ms_per_image']:.3f} ms/img, {b['share_of_handler_time']:.0%} of the "
        f"handler's time at batch {b['batch_size']}, runs on the {b['runs_on'].upper()}",
        "recommendations:",
    ]
    for key, advice in p.recommendations.items():
        lines.append(f"  {key:<18} {str(advice.value):<32} {advice.figure}")
    return "\n".join(lines)


def run_cli(mar: str, images: str, batch_sizes: str, micro_batch: int, seconds: float, as_json: bool) -> int:
    if seconds <= 0:
        raise ProfileError(f"--seconds {seconds}: must be positive")
    result = profile(Path(mar), Path(images), parse_batch_sizes(batch_sizes), micro_batch, seconds)
    print(result.to_json() if as_json else format_profile(result))
    return 0
