"""Offline batch inference, four ways, on the same model, images and host, in one run (issue 22):

  (a) `tsgpu batch` with the local engine (offline.engines.local: worker processes, no HTTP);
  (b) the same archive served by a stock torchserve, a client pushing every image through it at its best
      concurrency (tried: --concurrency);
  (c) a hand-written Ray Data job as Ray's batch-inference guide writes it: `ray.data.read_images`,
      torchvision transforms in `map`, `map_batches` with an actor pool holding the model;
  (d) `tsgpu batch --engine ray` on one node (offline.engines.ray; Ray started for the job).

Model: mobilenet_v3_small with random weights and batch-norm statistics calibrated on the images
(`make_model`: no pretrained weights here; calibrated, its top-1 depends on the pixels), the
classifier archive's default preprocessing (resize 256, center crop 224, ImageNet mean/std); (c)
uses the same sizes and statistics through torchvision transforms. Images: --images JPEGs of --size.

Throughput is the marginal images/s: each batch job runs twice, on the first half of the images and
on all of them, and images/s = (the half's count) / (the difference of the two wall times), which
leaves out what every run pays once (Ray or worker start-up, model loading, planning). For (b) the
server is started and warmed up first, and images/s is one pass of all images over its wall time.
The end-to-end wall time of the full run is printed beside it. On a busy host the start-up of a
job can vary by more than the half's run time; that round's marginal is then nan (left out of the
median). So (a) and (d) also report their steady images/s, from the job's own per-batch progress
(first batch to last; start-up excluded as (b)'s warm server excludes its own), and (a)'s steady
images/s over (b)'s and (c)'s images/s. The accuracy contract: (b) must answer
the bodies of (a) byte for byte; (c)'s and (d)'s top-1 class must match (a)'s (the share that does is
printed; random weights make top-1 sensitive to any pixel difference in preprocessing).

    python -m benchmarks.batch --images 1600 --size 480x360 --workers 2 --rounds 2

Targets (issue 22): (a) >= 1.5x (b) and >= 2x (c) in images/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from archiver_scripts import samples

TARGETS = {"b": 1.5, "c": 2.0}  # (a) / (x) at least this
MODEL_NAME = "batch_bench"


@dataclass
class Result:
    """One way's run: marginal images/s, wall seconds, and top-1 (or the body) per image name."""

    label: str
    images: int = 0
    ips: float = 0.0  # marginal images/s (see the module docstring)
    wall_s: float = 0.0  # end to end, all images
    top1: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, str] = field(default_factory=dict)
    note: str = ""
    steady: float = float("nan")  # (a), (d): images/s from the job's own progress, start-up excluded


# -- inputs ----------------------------------------------------------------------------------------


def make_inputs(workdir: Path, count: int, size: tuple[int, int], quality: int) -> Path:
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data = samples.encode(samples.mosaic(size[0], size[1], offset=i), "JPEG", quality=quality)
        (images / f"img_{i:05d}.jpg").write_bytes(data)
    return images


def make_model(workdir: Path, images: Path, calibration: int = 64) -> tuple[Path, Path]:
    """mobilenet_v3_small, random weights (seed 0), its batch-norm statistics calibrated on the first
    `calibration` benchmark images (train-mode passes, no weight update), TorchScript. Freshly
    initialised batch norms leave logits near 1e-9 and every class at probability 0.001, so top-1 would
    be noise; calibrated, the logits spread and top-1 says something about the pixels it saw."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=1000)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration passes
    files = sorted(images.iterdir())[:calibration]
    model.train()
    with torch.no_grad():
        for start in range(0, len(files), 16):
            arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + 16]]
            model(torch.stack([guide_transforms()(a) for a in arrays]))
    model.eval()
    path = workdir / "mobilenet_v3_small_calibrated.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    labels = workdir / "index_to_name.json"
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(1000)}))
    return path, labels


def build(workdir: Path, images: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(archive, TorchScript model) for the run."""
    from archiver_scripts.archive import build_archive

    model, labels = make_model(workdir, images)
    archive = build_archive(MODEL_NAME, model, workdir / "store", labels=labels, batch_size=args.batch_size,
                            max_batch_delay=10, workers=args.workers, config=["classifier.top_k=1"],
                            log=lambda message: None)
    return archive, model


def top1_from_parts(out: Path) -> tuple[dict[str, int], dict[str, str]]:
    import pyarrow.parquet as pq

    top1, bodies = {}, {}
    for part in sorted(out.glob("part-*.parquet")):
        for row in pq.read_table(part, columns=["uri", "status", "response"]).to_pylist():
            name = Path(row["uri"]).name
            bodies[name] = row["response"]
            if row["status"] == 200:
                top1[name] = json.loads(row["response"])["predictions"][0]["index"]
    return top1, bodies


# -- (a) and (d): tsgpu batch ------------------------------------------------------------------------


def run_tsgpu(engine: str, archive: Path, files: list[Path], workdir: Path, args: argparse.Namespace
              ) -> tuple[float, dict[str, int], dict[str, str], float]:
    """One `tsgpu batch` job over `files`: (wall seconds, top-1 by name, body by name, steady images/s).

    Steady images/s: the rows answered after the job's first batch over the time from that batch
    to the last one, from the job's own per-batch progress: start-up (processes or actors,
    imports, loading the archive) left out, as (b)'s warm server leaves out its start-up. A worker
    still loading when the first batch of another is done counts against it (conservative)."""
    from offline.job import InputRef, finish, plan_job, prepare_output

    out = workdir / f"out-{engine}-{len(files)}"
    refs = [InputRef(str(f.resolve()), "file") for f in files]
    started = time.perf_counter()
    # the default shard size (offline.job.default_shard_size: ~4 shards per worker), as a user gets it
    job, shards = plan_job(archive, refs, out, batch_size=args.batch_size, workers=args.workers)
    prepare_output(job, shards, overwrite=True)
    marks: list[tuple[float, int]] = []

    def progress(rows: int, errors: int) -> None:
        marks.append((time.perf_counter(), (marks[-1][1] if marks else 0) + rows))

    if engine == "ray":
        from offline.engines import ray as ray_engine

        summary = ray_engine.run(job, shards, args.workers, progress=progress)
    else:
        from offline.engines import local

        summary = local.run(job, shards, args.workers, progress)
    finish(job, shards, [summary])
    wall = time.perf_counter() - started
    steady = ((marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
              if len(marks) > 1 and marks[-1][0] > marks[0][0] else float("nan"))
    return (wall, *top1_from_parts(out), steady)


def marginal(label: str, run: Any, files: list[Path], note: str) -> Result:
    """Run on the first half of `files`, then on all: images/s from the difference (module docstring)."""
    half = files[: len(files) // 2]
    wall_half, *_ = run(half)
    wall_all, top1, bodies, *steady = run(files)
    extra = len(files) - len(half)
    # nan when start-up varied by more than the half's run time (a busy host): the run says nothing then
    ips = extra / (wall_all - wall_half) if wall_all > wall_half else float("nan")
    return Result(label, len(files), ips, wall_all, top1, bodies,
                  note=f"{note}; wall {wall_half:.1f} s for {len(half)}, {wall_all:.1f} s for {len(files)}",
                  steady=steady[0] if steady else float("nan"))


# -- (b): torchserve and a client --------------------------------------------------------------------


def push_all(url: str, files: list[Path], concurrency: int) -> tuple[dict[str, tuple[int, str]], float]:
    """Send every file once from `concurrency` keep-alive connections; (name -> (status, body), wall)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    todo: queue.Queue[Path] = queue.Queue()
    for f in files:
        todo.put(f)
    answers: dict[str, tuple[int, str]] = {}
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        while True:
            try:
                path = todo.get_nowait()
            except queue.Empty:
                break
            conn.request("POST", parts.path, body=path.read_bytes(),
                         headers={"Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            body = response.read().decode("utf-8", errors="replace")
            with lock:
                answers[path.name] = (response.status, body)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - started


def run_torchserve(archive: Path, files: list[Path], workdir: Path, args: argparse.Namespace) -> Result:
    from archiver_scripts.server import TorchServe

    server = TorchServe(archive.parent, models=[archive.name], workdir=tempfile.mkdtemp(dir=workdir, prefix="ts-"),
                        env={"OMP_NUM_THREADS": "1"})  # the fast setting on this host (docs/benchmarks.md)
    best: Result | None = None
    tried = []
    with server:
        started = time.perf_counter()
        server.wait_ready([MODEL_NAME], timeout=300)
        startup = time.perf_counter() - started
        url = f"{server.inference_url}/predictions/{MODEL_NAME}"
        push_all(url, files[: max(8, len(files) // 10)], 4)  # warm-up, unmeasured
        for concurrency in args.concurrency:
            answers, wall = push_all(url, files, concurrency)
            ips = len(files) / wall
            tried.append(f"c={concurrency}: {ips:.1f}/s")
            if best is None or ips > best.ips:
                top1 = {n: json.loads(b)["predictions"][0]["index"] for n, (s, b) in answers.items() if s == 200}
                best = Result("(b) torchserve + client", len(answers), ips, wall + startup, top1,
                              {n: b for n, (_, b) in answers.items()})
    assert best is not None
    best.note = f"best of {', '.join(tried)}; wall = start-up {startup:.0f} s + one pass"
    return best


# -- (c): Ray Data, as Ray's batch-inference guide writes it -------------------------------------------


class GuideModel:
    """The guide's model actor: load once, `__call__` on a batch of transformed images."""

    def __init__(self, model_path: str) -> None:
        import torch

        self.model = torch.jit.load(model_path).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.as_tensor(batch["transformed_image"]))
        return {"path": batch["path"], "top1": logits.argmax(dim=1).numpy()}


@lru_cache(maxsize=1)
def guide_transforms() -> Any:
    """The guide's torchvision transforms, at the archive's sizes and statistics."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.ToTensor(), transforms.Resize(256), transforms.CenterCrop(224),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def guide_transform(row: dict[str, Any]) -> dict[str, Any]:
    return {"path": row["path"], "transformed_image": guide_transforms()(row["image"]).numpy()}


def run_ray_data(model: Path, files: list[Path], args: argparse.Namespace) -> tuple[float, dict[str, int], dict]:
    """One Ray Data job over `files`, Ray started for it: (wall seconds, top-1 by name, {})."""
    import ray
    from ray.data import ActorPoolStrategy

    # by module name, not __main__ (`python -m benchmarks.batch`), so that Ray's workers can import them
    from benchmarks.batch import GuideModel, guide_transform

    started = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="WARNING")
    try:
        ds = ray.data.read_images([str(f) for f in files], mode="RGB", include_paths=True)
        ds = ds.map(guide_transform)
        predictions = ds.map_batches(GuideModel, fn_constructor_args=(str(model),), batch_size=args.batch_size,
                                     compute=ActorPoolStrategy(size=args.workers), num_cpus=ray_actor_cpus(args))
        top1 = {}
        for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
            for path, cls in zip(batch["path"], batch["top1"], strict=True):
                top1[Path(str(path)).name] = int(cls)
    finally:
        ray.shutdown()
    return time.perf_counter() - started, top1, {}


def ray_actor_cpus(args: argparse.Namespace) -> float:
    """CPUs each model actor reserves. With the default (1), actors holding every CPU of a small host
    leave none for the read tasks and Ray Data waits forever: the pool shares all CPUs but one."""
    cpus = os.cpu_count() or 1
    return max(0.25, (cpus - 1) / args.workers) if cpus > 1 else 0.5


# -- report ---------------------------------------------------------------------------------------------


def agreement(result: Result, reference: Result) -> str:
    shared = [n for n in reference.top1 if n in result.top1]
    same = sum(result.top1[n] == reference.top1[n] for n in shared)
    text = f"top-1 = (a)'s on {same}/{len(reference.top1)}"
    if result.bodies:
        identical = sum(result.bodies.get(n) == b for n, b in reference.bodies.items())
        text += f", bodies identical {identical}/{len(reference.bodies)}"
    return text


def report(runs: dict[str, list[Result]], args: argparse.Namespace) -> dict[str, Any]:
    """Per way: the median images/s over the rounds (each round listed), wall time, the
    ratio (a)/(x) against its target, and the accuracy contract checked against (a)'s last round."""
    median = {key: _median(r.ips for r in rs) for key, rs in runs.items()}
    steady = {key: _median(r.steady for r in rs) for key, rs in runs.items()}
    a = runs["a"][-1] if "a" in runs else None
    print(f"\nhost {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
          f"images/s = median of {args.rounds} round(s)")
    print(f"{'way':<30} {'images':>6} {'images/s':>9} {'wall s':>7}  (a) / this (median images/s; median wall)")
    rows = []
    for key, rs in runs.items():
        r = rs[-1]
        ratio = median["a"] / median[key] if "a" in median and key != "a" and median[key] else None
        ratio = None if ratio is not None and math.isnan(ratio) else ratio
        steady_ratio = steady["a"] / median[key] if "a" in steady and key in ("b", "c") and median[key] else None
        steady_ratio = None if steady_ratio is not None and math.isnan(steady_ratio) else steady_ratio
        walls = [x.wall_s for x in rs]
        e2e = statistics.median(x.wall_s for x in rs) / statistics.median(x.wall_s for x in runs["a"]) \
            if "a" in runs and key != "a" else None
        target = f" (target >= {TARGETS[key]}x)" if key in TARGETS else ""
        check = agreement(r, a) if a and key != "a" else ""
        rounds = ", ".join(f"{x.ips:.1f}" for x in rs)
        print(f"{r.label:<30} {r.images:>6} {median[key]:>9.1f} {statistics.median(walls):>7.1f}  "
              f"{f'(a) = {ratio:.2f}x' if ratio else ''}{target}"
              f"{f'; end to end (a) = {e2e:.2f}x' if e2e else ''}"
              f"{f'; (a) steady = {steady_ratio:.2f}x' if steady_ratio else ''}; {check}")
        print(f"{'':<30} rounds: {rounds} images/s, {', '.join(f'{w:.1f}' for w in walls)} s; last: {r.note}")
        if not math.isnan(steady[key]):
            print(f"{'':<30} steady (start-up excluded): {steady[key]:.1f} images/s (rounds: "
                  f"{', '.join(f'{x.steady:.1f}' for x in rs)})")
        rows.append({"way": key, "label": r.label, "images": r.images, "images_per_s": round(median[key], 1),
                     "rounds": [round(x.ips, 1) for x in rs], "wall_s": [round(x.wall_s, 1) for x in rs],
                     "steady_images_per_s": None if math.isnan(steady[key]) else round(steady[key], 1),
                     "steady_rounds": [round(x.steady, 1) for x in rs],
                     "a_over_this": round(ratio, 2) if ratio else None, "target": TARGETS.get(key),
                     "a_steady_over_this": round(steady_ratio, 2) if steady_ratio else None,
                     "a_over_this_end_to_end": round(e2e, 2) if e2e else None,
                     "accuracy": check, "note": r.note})
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "args": vars(args) | {"workdir": None},
            "results": rows}


def _median(values: Any) -> float:
    """The median of the values that are numbers (nan: a round that measured nothing); nan if none."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else float("nan")


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="number of JPEGs (default 300)")
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="WxH of each image (default 640x480)")
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--workers", type=int, default=2, help="worker processes / actors / torchserve workers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16],
                        help="client concurrencies tried for (b) (default 2,4,8,16)")
    parser.add_argument("--ways", default="abcd", help="which of a, b, c, d to run (default abcd)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the ways this many times, interleaved (a shared host's load drifts); medians")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the torchserve and Ray started here are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tsgpu-batch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        images = make_inputs(workdir, args.images, args.size, args.quality)
        archive, model = build(workdir, images, args)
        files = sorted(images.iterdir())
        engine_note = f"{args.workers} workers, batch {args.batch_size}"
        pool_note = (f"read_images + map + map_batches(ActorPoolStrategy(size={args.workers}), "
                     f"batch_size={args.batch_size}, num_cpus={ray_actor_cpus(args):g})")
        ways = {
            "a": lambda: marginal("(a) tsgpu batch, local", lambda f: run_tsgpu("local", archive, f, workdir, args),
                                  files, engine_note),
            "b": lambda: run_torchserve(archive, files, workdir, args),
            "c": lambda: marginal("(c) Ray Data (guide)", lambda f: run_ray_data(model, f, args), files, pool_note),
            "d": lambda: marginal("(d) tsgpu batch --engine ray", lambda f: run_tsgpu("ray", archive, f, workdir, args),
                                  files, engine_note + ", Ray started for the job"),
        }
        runs: dict[str, list[Result]] = {}
        for round_ in range(1, args.rounds + 1):
            for key in (k for k in "abcd" if k in args.ways):
                print(f"round {round_}: running {key} ...", flush=True)
                result = ways[key]()
                runs.setdefault(key, []).append(result)
                print(f"  {result.label}: {result.ips:.1f} images/s, {result.wall_s:.1f} s; {result.note}", flush=True)
        summary = report(runs, args)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
