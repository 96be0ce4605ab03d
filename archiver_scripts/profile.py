"""`tsgpu profile`: where one worker's time goes, stage by stage, and what to change.

    tsgpu profile ARCHIVE.mar --images DIR [--batch-sizes 1,4,8] [--micro-batch 0,auto]
                  [--decode-processes 0,auto] [--seconds N] [--json]

The archive is unpacked to a temporary directory and its handler loaded in this process the way a
TorchServe worker loads it (ts/model_loader.py + ts/service.py): the archive's directory first on
sys.path, so its entry file (`tsgpu_entry.py`) imports the archive's own copy of `handlers`; the
manifest from MAR-INF/MANIFEST.json; `model-config.yaml` (the manifest's configFile) as the
context's `model_yaml_config`; the GPU 0 when CUDA is available. The context is our FakeContext, so
the handler's own per-stage metrics (handlers/stages.py) are recorded instead of logged; the profile
is built from those. Nothing is served.

Two sweeps, so that a profile stays short (each handler load costs seconds):

1. every batch size, with the first `--micro-batch` and `--decode-processes` values (default 0 and
   0: the plain path, no micro-batches and no decode processes) -> the batch size to recommend;
2. at that batch size, every other (micro_batch, decode_processes) pair, the handler loaded once per
   pair with `handler.pipeline.*` overridden in its model-config -> the pipeline settings to
   recommend. A micro-batch not smaller than the batch size is skipped (the handler pipelines only
   batches larger than one micro-batch).
"""

from __future__ import annotations

import dataclasses
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

from archiver_scripts.cpu_time import cpu_seconds
from handlers.runtime import available_cpus, cpu_threads_per_worker
from handlers.stages import DECODE, DEVICE_IDLE, FORWARD, OVERLAP, STAGES, UPLOAD
from handlers.testing import FakeContext, raw_request, run_handler

NOT_AVAILABLE = "not available in this archive"
AUTO = "auto"
OTHER = "other"  # handler time in no stage: responses (JSON), bookkeeping
_SAME_THROUGHPUT = 0.05  # settings within 5% of the best count as equally fast (take the simpler)


class ProfileError(ValueError):
    """A bad `tsgpu profile` argument or archive; the message names it and the fix."""


class HandlerFailed(RuntimeError):
    """The archive's handler failed to load. Its own error classes come from the archive's copy of
    `handlers`, not this process's, so they are wrapped here under one name the CLI can catch."""


@dataclass(frozen=True)
class Setting:
    """The `handler.pipeline` keys one handler load runs with."""

    micro_batch: int = 0
    decode_processes: int = 0

    def describe(self) -> str:
        return f"micro_batch {self.micro_batch}, decode_processes {self.decode_processes}"


@dataclass
class Run:
    """One measurement: a batch size under one pipeline setting."""

    batch_size: int
    micro_batch: int
    decode_processes: int
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
    torch_threads: int = 0  # the handler's torch intra-op threads under this setting (plan_threads)

    @property
    def setting(self) -> Setting:
        return Setting(self.micro_batch, self.decode_processes)


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
    notes: list[str] = field(default_factory=list)

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


def archive_yaml(model_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The archive's model-config.yaml (empty when it has none)."""
    from ts.utils.util import get_yaml_config

    config_file = manifest.get("model", {}).get("configFile")
    return dict(get_yaml_config(model_dir / config_file) or {}) if config_file else {}


def with_setting(yaml_config: dict[str, Any], setting: Setting | None) -> dict[str, Any]:
    """A copy of the model-config with `handler.pipeline.micro_batch/decode_processes` set."""
    if setting is None:
        return dict(yaml_config)
    handler = dict(yaml_config.get("handler") or {})
    handler["pipeline"] = {**(handler.get("pipeline") or {}), "micro_batch": setting.micro_batch,
                           "decode_processes": setting.decode_processes}
    return {**yaml_config, "handler": handler}


def load_handler(model_dir: Path, manifest: dict[str, Any], batch_size: int,
                 setting: Setting | None = None) -> tuple[Any, FakeContext]:
    """Import the entry module and initialize its one handler class, as TsModelLoader.load does,
    with the pipeline `setting` written into the model-config it reads. Call inside
    `archive_imports(model_dir, entry)`."""
    from ts.utils.util import list_classes_from_module

    model = manifest.get("model", {})
    entry = Path(model.get("handler", "")).stem
    module = importlib.import_module(entry)
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        raise ProfileError(f"{model.get('handler')}: expected one handler class, found {len(classes)}")
    yaml_config = {**with_setting(archive_yaml(model_dir, manifest), setting), "batchSize": batch_size}
    context = FakeContext(
        model_dir, model_yaml_config=yaml_config, batch_size=batch_size,
        gpu_id=0 if torch.cuda.is_available() else None, model_name=model.get("modelName", "model"),
        manifest=manifest,
    )
    handler = classes[0]()
    handler.initialize(context)
    return handler, context


def close_handler(handler: Any) -> None:
    """Stop what a handler started (decode processes, pipeline threads) before the next load."""
    close = getattr(handler, "close", None)
    if callable(close):
        close()
        return
    for part in (getattr(handler, "_pipeline", None), getattr(handler, "preprocessor", None)):
        if part is not None and callable(getattr(part, "close", None)):
            part.close()


def pipeline_supported() -> bool:
    """Whether the archive's copy of `handlers` knows `handler.pipeline` (older archives do not)."""
    from handlers.config import HandlerConfig  # the archive's copy

    return any(f.name == "pipeline" for f in dataclasses.fields(HandlerConfig))


# -- measuring -------------------------------------------------------------------------------------


def read_images(directory: Path) -> list[bytes]:
    if not directory.is_dir():
        raise ProfileError(f"--images {directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ProfileError(f"--images {directory}: no files in it (put a few JPEG/PNG images there)")
    return [p.read_bytes() for p in files]


def measure(handler: Any, context: FakeContext, images: list[bytes], batch_size: int, seconds: float,
            setting: Setting = Setting()) -> Run:
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
    cpu0, started = cpu_seconds(), time.perf_counter()
    while batches < 2 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        responses = run_handler(handler, context, next_batch())
        wall += time.perf_counter() - t0
        batches += 1
        images_sent += batch_size
        errors += sum(r.status != 200 for r in responses)
    cores_busy = (cpu_seconds() - cpu0) / max(time.perf_counter() - started, 1e-9)
    return _summarise(context.metrics.calls[start_calls:], batch_size, setting, batches, images_sent, errors,
                      wall, cores_busy)


def _summarise(calls: list, batch_size: int, setting: Setting, batches: int, images: int, errors: int,
               wall: float, cores_busy: float) -> Run:
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
        batch_size=batch_size, micro_batch=setting.micro_batch, decode_processes=setting.decode_processes,
        batches=batches, images=images, errors=errors,
        wall_seconds=round(wall, 4), images_per_second=round(ok / wall, 2) if wall > 0 else 0.0,
        ms_per_image=per_image, device_idle_ms_per_batch=None if idle is None else round(idle, 3),
        overlap_percent=round(overlap, 2), cpu_cores_busy=round(cores_busy, 2),
        bounding_stage=max(STAGES, key=lambda n: per_image[n]), torch_threads=torch.get_num_threads(),
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


def best_setting(runs: list[Run]) -> Run:
    """The fastest pipeline setting; within 5% of the fastest, the simplest: fewest decode
    processes (each is a process with its own memory), then the smallest micro-batch (0 = off)."""
    top = max(r.images_per_second for r in runs)
    close = [r for r in runs if r.images_per_second >= top * (1 - _SAME_THROUGHPUT)]
    return min(close, key=lambda r: (r.decode_processes, r.micro_batch))


def bottleneck(run: Run, device: str, backend: str) -> dict[str, Any]:
    stage = run.bounding_stage
    total = sum(run.ms_per_image.values())
    return {
        "stage": stage, "batch_size": run.batch_size, "micro_batch": run.micro_batch,
        "decode_processes": run.decode_processes, "ms_per_image": run.ms_per_image[stage],
        "share_of_handler_time": round(run.ms_per_image[stage] / total, 3) if total else 0.0,
        "runs_on": runs_on(stage, device, backend),
    }


def split_runs(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """(the batch-size sweep, every run at the recommended batch size): the sweep is the runs under
    the first run's setting; the batch size is picked from those."""
    base = runs[0].setting
    sweep = [r for r in runs if r.setting == base]
    chosen = best_run(sweep).batch_size
    return sweep, [r for r in runs if r.batch_size == chosen]


def recommend(runs: list[Run], device: str, backend: str, backends: dict[str, str | None],
              auto_backend: str, host_cpus: int, archive_batch: int,
              pipeline_reason: str | None = None) -> dict[str, Advice]:
    """Each recommendation with the measured figure behind it. `runs[0]`'s setting is the baseline
    of the batch-size sweep; `pipeline_reason` says why pipeline settings could not be measured."""
    sweep, at_batch = split_runs(runs)
    by_size = best_run(sweep)
    first = min(sweep, key=lambda r: r.batch_size)
    chosen = best_setting(at_batch)
    neck = bottleneck(chosen, device, backend)
    total_ms = sum(chosen.ms_per_image.values())
    return {
        "batchSize": Advice(by_size.batch_size, (
            f"{by_size.images_per_second:.1f} img/s at batch {by_size.batch_size} vs {first.images_per_second:.1f} at "
            f"{first.batch_size} ({by_size.setting.describe()}; archive has batchSize {archive_batch}; "
            f"smallest within 5% of the fastest)")),
        "micro_batch": _knob_advice("micro_batch", chosen, at_batch, pipeline_reason, neck),
        "decode_processes": _knob_advice("decode_processes", chosen, at_batch, pipeline_reason, neck),
        "workers": _workers(chosen, neck, host_cpus, total_ms),
        "preprocess_backend": _backend_advice(backend, backends, auto_backend, chosen.ms_per_image[DECODE],
                                              total_ms, device),
    }


def _knob_advice(knob: str, chosen: Run, at_batch: list[Run], unavailable: str | None,
                 neck: dict[str, Any]) -> Advice:
    """One pipeline key: the chosen run's value against the best measured alternative value with
    the other key held at the chosen run's value."""
    other = "decode_processes" if knob == "micro_batch" else "micro_batch"
    value = getattr(chosen, knob)
    peers = [r for r in at_batch if getattr(r, other) == getattr(chosen, other) and getattr(r, knob) != value]
    held = f"batch {chosen.batch_size}, {other} {getattr(chosen, other)}"
    if unavailable is not None and not peers:
        return Advice(NOT_AVAILABLE if value == 0 else value, f"{unavailable}; measured only {knob} {value} ({held})")
    if not peers:
        return Advice(value, f"{chosen.images_per_second:.1f} img/s at {knob} {value} ({held}); no other value "
                             f"measured at this batch size")
    alt = max(peers, key=lambda r: r.images_per_second)
    verdict = ("faster" if chosen.images_per_second > alt.images_per_second * (1 + _SAME_THROUGHPUT)
               else "within 5%: the simpler setting")
    figure = (f"{chosen.images_per_second:.1f} img/s at {knob} {value} vs {alt.images_per_second:.1f} at "
              f"{getattr(alt, knob)} ({held}; {verdict}); overlap {chosen.overlap_percent:.0f}%")
    if knob == "micro_batch":
        figure += f", bounded by {neck['stage']} at {neck['ms_per_image']:.2f} ms/img"
    else:
        figure += f", decode {chosen.ms_per_image[DECODE]:.2f} vs {alt.ms_per_image[DECODE]:.2f} ms/img"
    return Advice(value, figure)


def _workers(best: Run, neck: dict[str, Any], host_cpus: int, total_ms: float) -> Advice:
    if neck["runs_on"] == "gpu":
        return Advice(1, (
            f"the bounding stage {neck['stage']} runs on the GPU ({neck['ms_per_image']:.2f} of {total_ms:.2f} "
            f"ms/img): another worker adds a CUDA context and a model copy, not throughput"))
    busy = max(best.cpu_cores_busy, 0.05)
    workers = max(1, min(host_cpus, math.floor(host_cpus / busy + 0.25)))
    return Advice(workers, (
        f"the bounding stage {neck['stage']} runs on the CPU ({neck['ms_per_image']:.2f} of {total_ms:.2f} ms/img) "
        f"and one worker ({best.setting.describe()}) keeps {best.cpu_cores_busy:.2f} of {host_cpus} CPUs busy "
        f"(CPU time of it and its decode processes / wall): {host_cpus}/{best.cpu_cores_busy:.2f} -> {workers} "
        f"worker(s) (the handler divides the CPUs by minWorkers)"))


def _backend_advice(backend: str, backends: dict[str, str | None], auto_backend: str, decode_ms: float,
                    total_ms: float, device: str) -> Advice:
    usable = [name for name, why in backends.items() if why is None]
    share = decode_ms / total_ms if total_ms else 0.0
    figure = (f"decode {decode_ms:.2f} ms/img ({share:.0%} of the handler's time) on {backend}; "
              f"usable on {device}: {', '.join(usable) or 'none'}; `auto` picks {auto_backend}")
    if auto_backend != backend:
        figure += f" (this archive pins {backend}: try handler.preprocess.backend: auto)"
    return Advice(auto_backend, figure)


# -- the command ---------------------------------------------------------------------------------


def _int_list(text: str, flag: str, minimum: int, example: str, allow_auto: bool = False) -> list[int | str]:
    values: list[int | str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if allow_auto and token == AUTO:
            values.append(AUTO)
            continue
        try:
            number = int(token)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            kind = "positive integers" if minimum > 0 else "integers >= 0"
            hint = f" or {AUTO}" if allow_auto else ""
            raise ProfileError(f"{flag} {text!r}: use comma-separated {kind}{hint}, e.g. {example}")
        values.append(number)
    if not values:
        raise ProfileError(f"{flag} {text!r}: give at least one value, e.g. {example}")
    return list(dict.fromkeys(values))  # keep the order (the first is the sweep's), drop repeats


def parse_batch_sizes(text: str) -> list[int]:
    return sorted(_int_list(text, "--batch-sizes", 1, "1,4,8"))  # type: ignore[type-var]


def parse_settings(text: str, flag: str) -> list[int | str]:
    """`--micro-batch` / `--decode-processes`: integers >= 0 and `auto`, in the order given."""
    return _int_list(text, flag, 0, "0,2,4" if flag == "--micro-batch" else "0,2", allow_auto=True)


def resolve_micro_batches(values: list[int | str], batch_size: int) -> list[int]:
    """`auto` = half the batch size (two micro-batches: the smallest split that overlaps)."""
    resolved = [(batch_size // 2 if v == AUTO else v) for v in values]
    return list(dict.fromkeys(int(v) for v in resolved))


def resolve_decode_processes(values: list[int | str], worker_cpus: int) -> list[int]:
    """`auto` = half this worker's CPU share, at least 1 (the other half keeps torch's threads)."""
    return list(dict.fromkeys(int(max(1, worker_cpus // 2) if v == AUTO else v) for v in values))


def profile(mar: Path, images_dir: Path, batch_sizes: list[int], micro_batch: list[int | str] | None = None,
            seconds: float = 3.0, decode_processes: list[int | str] | None = None) -> Profile:
    images = read_images(images_dir)
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="tsgpu-profile-") as tmp:
        model_dir = Path(tmp)
        manifest = unpack(mar, model_dir)
        entry = Path(manifest.get("model", {}).get("handler", "")).stem
        try:
            with archive_imports(model_dir, entry):
                return _profile_loaded(mar, model_dir, manifest, images, batch_sizes, seconds,
                                       micro_batch or [0], decode_processes or [0])
        finally:
            torch.set_num_threads(threads_before)  # initialize sized torch's pool for a worker


@contextmanager
def _loaded(mar: Path, model_dir: Path, manifest: dict[str, Any], batch_size: int,
            setting: Setting | None) -> Iterator[tuple[Any, FakeContext]]:
    try:
        handler, context = load_handler(model_dir, manifest, batch_size, setting)
    except ProfileError:
        raise
    except Exception as exc:
        what = f" with {setting.describe()}" if setting else ""
        raise HandlerFailed(f"loading {mar.name}{what} failed: {type(exc).__name__}: {exc}") from exc
    try:
        yield handler, context
    finally:
        close_handler(handler)


def _measure_all(mar: Path, handler: Any, context: FakeContext, images: list[bytes], sizes: list[int],
                 seconds: float, setting: Setting) -> list[Run]:
    try:
        return [measure(handler, context, images, bs, seconds, setting) for bs in sizes]
    except Exception as exc:
        raise HandlerFailed(f"running {mar.name}'s handler ({setting.describe()}) failed: "
                            f"{type(exc).__name__}: {exc}") from exc


def _profile_loaded(mar: Path, model_dir: Path, manifest: dict[str, Any], images: list[bytes],
                    batch_sizes: list[int], seconds: float, micro_batch: list[int | str],
                    decode_processes: list[int | str]) -> Profile:
    import handlers.preprocess as preprocess  # the archive's copy
    from handlers.preprocess import backend_module, resolve_backend  # the archive's copy

    yaml_config = archive_yaml(model_dir, manifest)
    notes: list[str] = []
    supported = pipeline_supported()
    reason = None if supported else "this archive's handlers predate handler.pipeline (rebuild it with tsgpu archive)"
    worker_cpus = cpu_threads_per_worker(0, yaml_config)
    load_size = max(batch_sizes)
    decode_list = resolve_decode_processes(decode_processes, worker_cpus)
    first_mb = resolve_micro_batches(micro_batch[:1], load_size)[0]
    base = Setting(first_mb, decode_list[0]) if supported else None
    base_run_setting = base or Setting()
    with _loaded(mar, model_dir, manifest, load_size, base) as (handler, context):
        runs = _measure_all(mar, handler, context, images, batch_sizes, seconds, base_run_setting)
        device, backend = str(handler.device), handler.preprocessor.name
        # The archive's registry names its backends; an archive older than the registry had these four.
        names = getattr(preprocess, "BACKEND_NAMES", ("cpu", "torchvision", "dali", "cvcuda"))
        backends = {name: backend_module(name).availability(handler.device) for name in names}
        auto = resolve_backend("auto", handler.device)
        torch_threads = torch.get_num_threads()
        handler_class = f"{type(handler).__mro__[1].__module__}.{type(handler).__mro__[1].__name__}"
    chosen_size = best_run(runs).batch_size
    if supported:
        for setting in _pipeline_settings(micro_batch, decode_list, chosen_size, base_run_setting, notes):
            with _loaded(mar, model_dir, manifest, load_size, setting) as (handler, context):
                runs += _measure_all(mar, handler, context, images, [chosen_size], seconds, setting)
    elif len(micro_batch) > 1 or len(decode_processes) > 1 or base_run_setting != Setting():
        notes.append(f"pipeline settings not measured: {reason}")
    host_cpus = available_cpus()
    result = Profile(
        archive=str(mar), model=manifest.get("model", {}).get("modelName", ""), device=device,
        handler={"class": handler_class, "preprocess_backend": backend, "torch_threads": torch_threads,
                 "archive_batch_size": int(yaml_config.get("batchSize", 1)), "worker_cpus": worker_cpus,
                 "backends": backends, "pipeline_supported": supported},
        host_cpus=host_cpus, images=len(images), runs=runs, notes=notes,
    )
    result.recommendations = recommend(runs, device, backend, backends, auto, host_cpus,
                                       result.handler["archive_batch_size"], reason)
    result.bottleneck = bottleneck(best_setting(split_runs(runs)[1]), device, backend)
    return result


def _pipeline_settings(micro_batch: list[int | str], decode_list: list[int], batch_size: int, base: Setting,
                       notes: list[str]) -> list[Setting]:
    """Every (micro_batch, decode_processes) pair for the second sweep, the baseline's excepted."""
    settings = []
    for mb in resolve_micro_batches(micro_batch, batch_size):
        if mb >= batch_size:
            notes.append(f"micro_batch {mb} skipped at batch {batch_size}: the handler pipelines only batches "
                         f"larger than one micro-batch")
            continue
        settings += [Setting(mb, dp) for dp in decode_list if Setting(mb, dp) != base]
    return settings


def format_profile(p: Profile) -> str:
    names = [*STAGES, OTHER]
    heads = ["read", "fetch", "decode", "upload", "forward", "postproc", "other"]
    lines = [
        f"tsgpu profile: {p.model} ({p.archive}) on {p.device}; preprocess {p.handler['preprocess_backend']}, "
        f"worker share {p.handler['worker_cpus']} CPU(s), {p.images} image(s), host {p.host_cpus} CPU(s)",
        "",
        "time per image (ms) by stage; mb = micro_batch, dp = decode_processes, thr = torch threads; "
        "img/s = successful images "
        "per second of handle(); cores = CPU time (with decode processes) / wall; overlap = StageOverlap %",
        f"{'batch':>5} {'mb':>3} {'dp':>3} {'thr':>3} " + " ".join(f"{h:>8}" for h in heads)
        + f" | {'img/s':>8} {'cores':>5} {'overlap':>7} {'idle/b':>7} {'errors':>6}  bounding",
    ]
    for r in p.runs:
        cells = " ".join(f"{r.ms_per_image[n]:8.3f}" if r.ms_per_image[n] else f"{'-':>8}" for n in names)
        idle = f"{r.device_idle_ms_per_batch:7.2f}" if r.device_idle_ms_per_batch is not None else f"{'-':>7}"
        lines.append(f"{r.batch_size:>5} {r.micro_batch:>3} {r.decode_processes:>3} {r.torch_threads:>3} {cells} | "
                     f"{r.images_per_second:8.1f} {r.cpu_cores_busy:5.2f} {r.overlap_percent:6.0f}% {idle} "
                     f"{r.errors:>6}  {r.bounding_stage}")
    b = p.bottleneck
    lines += [
        "",
        f"bottleneck: {b['stage']} - {b['ms_per_image']:.3f} ms/img, {b['share_of_handler_time']:.0%} of the "
        f"handler's time at batch {b['batch_size']} (micro_batch {b['micro_batch']}, decode_processes "
        f"{b['decode_processes']}), runs on the {b['runs_on'].upper()}",
        *[f"note: {n}" for n in p.notes],
        "recommendations:",
    ]
    for key, advice in p.recommendations.items():
        lines.append(f"  {key:<18} {str(advice.value):<10} {advice.figure}")
    return "\n".join(lines)


def run_cli(mar: str, images: str, batch_sizes: str, micro_batch: str, seconds: float, as_json: bool,
            decode_processes: str = "0") -> int:
    if seconds <= 0:
        raise ProfileError(f"--seconds {seconds}: must be positive")
    result = profile(Path(mar), Path(images), parse_batch_sizes(batch_sizes),
                     parse_settings(str(micro_batch), "--micro-batch"), seconds,
                     parse_settings(str(decode_processes), "--decode-processes"))
    print(result.to_json() if as_json else format_profile(result))
    return 0
