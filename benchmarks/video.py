"""Video benchmark: one clip classified three ways through one real torchserve, in one run.

A 60 s 1920x1080 30 fps H.264 clip (a photo mosaic panning across the frame, x264 veryfast, CRF 23,
a keyframe every --gop frames), one frame per second sampled, one classifier (the serving
benchmark's TorchScript MobileNetV3-small), one worker per model, the same server and environment:

    (a) ours           this library's video archive (`--media video`, sampling fps 1): the clip in
                       one request; only the sampled frames are decoded (seeking), in a decode process
    (b) client-side    what TorchServe's video example does: OpenCV decodes every frame on the client,
                       JPEG-encodes the sampled ones and posts each to TorchServe's stock
                       `image_classifier` handler (4 requests in flight)
    (c) decode-all     a handler that decodes every frame of the clip (PyAV, in the worker, each frame
                       converted to RGB as a frame reader does) and keeps one per second, then the
                       same frames -> model path as (a)

Per clip: CPU seconds of the client (this process) and of the server (torchserve's process tree:
frontend, workers, decode processes), their total, and the wall time from the first byte read to
the last answer. Prints the ratios against the targets: (a) >= 3x fewer CPU-seconds and >= 2x lower
wall time than (b).

    python -m benchmarks.video [--seconds 60] [--gop 60] [--json results.json]

Needs captum for the stock handler (TorchServe's vision handler imports it): pip install captum.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from archiver_scripts.server import TorchServe
from benchmarks.common import make_model, server_cpu_seconds

WIDTH, HEIGHT, FPS = 1920, 1080, 30
IN_FLIGHT = 4  # (b): requests the client keeps in flight while it decodes on
JPEG_QUALITY = 90
ENV = {"OMP_NUM_THREADS": "1"}
MODELS = ("stock", "ours", "decode_all")

# (c): a handler that decodes the whole clip, then samples; written into the archive by this module.
DECODE_ALL_HANDLER = '''"""Benchmark baseline (benchmarks/video.py): decode every frame, then keep one per second."""

import io
import json

import av
import torch

from handlers.preprocess.frames import FramePreprocessor
from handlers.tasks.classifier import ImageClassifier


class DecodeAllClassifier(ImageClassifier):
    def handle(self, data, context):
        row = data[0]
        clip = bytes(row.get("body") or row.get("data"))
        frames, times, next_t = [], [], 0.0
        with av.open(io.BytesIO(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")  # every frame, as a frame reader returns it
                if frame.time + 1e-6 >= next_t:
                    frames.append(torch.from_numpy(rgb).permute(2, 0, 1))
                    times.append(frame.time)
                    next_t += 1.0
        pre = FramePreprocessor(self._spec)
        summary = self.video_summary()
        bodies = []
        with torch.inference_mode():
            for start in range(0, len(frames), 16):
                batch = torch.stack(frames[start:start + 16])
                tensor, geometry = pre.run(batch)
                outputs = self.forward(tensor)
                results = self.run_postprocess(outputs, [geometry] * len(batch))
                summary.add(outputs, results, times[start:start + 16])
                bodies += [{"pts_s": t, **r} for t, r in zip(times[start:start + 16], results)]
        context.set_response_content_type(0, "application/json")
        return [json.dumps({"frames": bodies, "summary": summary.result()})]

    def _make_preprocessor(self, decode_threads):
        self._spec = super()._make_preprocessor(decode_threads)
        return self._spec
'''


# --- the clip ---------------------------------------------------------------------------------------


def make_clip(seconds: int, gop: int) -> bytes:
    """60 s of 1080p30: a photo mosaic panning 6 px per frame, x264 veryfast CRF 23, keyint `gop`."""
    import io

    import av

    canvas = samples.mosaic(WIDTH + 6 * FPS * seconds // 4 + 8, HEIGHT)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.options = {"preset": "veryfast", "crf": "23",
                                        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(seconds * FPS):
            x = (6 * i) % (canvas.shape[1] - WIDTH)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas[:, x:x + WIDTH]), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# --- archives -----------------------------------------------------------------------------------------


def build_archives(work: Path, store: Path, decoder: str = "auto") -> None:
    from benchmarks.serving import build_stock_archive

    model, labels = make_model(work)
    quiet = lambda message: None  # noqa: E731
    build_stock_archive(model, labels, store)  # "stock": TorchServe's image_classifier
    video = ["video.sampling.mode=fps", "video.sampling.fps=1", "video.frame_batch=16"]
    build_archive("ours", model, store, labels=labels, media="video", config=[*video, f"video.decoder={decoder}"],
                  force=True, log=quiet)
    handler = work / "decode_all.py"
    handler.write_text(DECODE_ALL_HANDLER)
    build_archive("decode_all", model, store, labels=labels, media="video", config=video, force=True, log=quiet,
                  handler_class="decode_all:DecodeAllClassifier", extra_files=[handler])


# --- the three ways -------------------------------------------------------------------------------------


def post(url: str, data: bytes, content_type: str = "application/octet-stream") -> dict[str, Any]:
    r = requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


def run_ours(server: TorchServe, clip: bytes, model: str) -> int:
    body = post(f"{server.inference_url}/predictions/{model}", clip)
    return len(body["frames"])


def run_client_side(server: TorchServe, clip_path: Path) -> int:
    """OpenCV decodes every frame; the one at or after each whole second is JPEG-encoded and posted."""
    import cv2

    url = f"{server.inference_url}/predictions/stock"
    capture = cv2.VideoCapture(str(clip_path))
    futures = []
    next_t = 0.0
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        while True:
            ok, frame = capture.read()  # BGR, every frame decoded and converted
            if not ok:
                break
            t = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if t + 1e-6 >= next_t:
                ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                futures.append(pool.submit(post, url, jpeg.tobytes()))
                next_t += 1.0
        capture.release()
        for f in futures:
            f.result()
    return len(futures)


def client_cpu_seconds() -> float:
    """This process's own CPU time (its threads: OpenCV's decoders, the JPEG encoder, the HTTP client).
    Not its children: torchserve is one of them, counted as the server."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def cpu_by_role(server: TorchServe) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds) of every live process of the server: the frontend (Java and its
    launcher), each model's worker, and the workers' children (decode processes)."""
    workers: dict[int, str] = {}
    for model in MODELS:
        with requests.get(f"{server.management_url}/models/{model}", timeout=10) as r:
            workers.update({int(w["pid"]): model for w in r.json()[0]["workers"] if w.get("pid")})
    out: dict[int, tuple[str, float]] = {}
    root = psutil.Process(server.process.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            owner = next((workers[p.pid] for p in proc.parents() if p.pid in workers), None)
        except psutil.Error:
            continue
        role = f"worker {workers[proc.pid]}" if proc.pid in workers else f"decode {owner}" if owner else "frontend"
        out[proc.pid] = (role, times.user + times.system)
    return out


def measure(label: str, server: TorchServe, run: Callable[[], int]) -> dict[str, Any]:
    roles0 = cpu_by_role(server)
    client0, server0 = client_cpu_seconds(), server_cpu_seconds(server)
    started = time.perf_counter()
    frames = run()
    wall = time.perf_counter() - started
    client, srv = client_cpu_seconds() - client0, server_cpu_seconds(server) - server0
    split: dict[str, float] = {}
    for pid, (role, seconds) in cpu_by_role(server).items():
        split[role] = round(split.get(role, 0.0) + seconds - roles0.get(pid, (role, 0.0))[1], 2)
    row = {"label": label, "frames": frames, "client_cpu_s": round(client, 2), "server_cpu_s": round(srv, 2),
           "total_cpu_s": round(client + srv, 2), "wall_s": round(wall, 2), "server_split": split}
    print(f"  {label}: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="clip length (default 60)")
    parser.add_argument("--gop", type=int, default=60, help="frames between keyframes (default 60 = 2 s)")
    parser.add_argument("--clip", type=Path, help="reuse this clip file (written there on the first run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--decoder", choices=["auto", "torchcodec", "pyav"], default="auto",
                        help="handler.video.decoder of (a), this library's archive (default auto)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("captum") is None:
        print("TorchServe's stock image_classifier handler needs captum: pip install captum", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="tsgpu-video-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        clip_path = args.clip or work / "clip.mp4"
        if clip_path.is_file():
            print(f"reusing {clip_path} (made with --seconds/--gop as given then)", flush=True)
        else:
            print(f"encoding a {args.seconds} s {WIDTH}x{HEIGHT} {FPS} fps H.264 clip (keyint {args.gop}) ...", flush=True)
            clip_path.write_bytes(make_clip(args.seconds, args.gop))
        clip = clip_path.read_bytes()
        warm = make_clip(2, args.gop)
        warm_path = work / "warm.mp4"
        warm_path.write_bytes(warm)
        print(f"  {len(clip) / 1e6:.1f} MB; building archives ...", flush=True)
        build_archives(work, store, args.decoder)
        server = TorchServe(store, models=[f"{m}.mar" for m in MODELS], workdir=work / "ts", env=ENV,
                            properties={"default_workers_per_model": "1", "max_request_size": str(256 * 2**20)})
        with server:
            server.wait_ready(list(MODELS), timeout=600)
            _one_worker_each(server)
            print("warming each path up on a 2 s clip ...", flush=True)
            run_ours(server, warm, "ours")
            run_ours(server, warm, "decode_all")
            run_client_side(server, warm_path)
            time.sleep(2)
            rows = [
                measure("(a) ours: one request, sampled frames decoded", server, lambda: run_ours(server, clip, "ours")),
                measure("(b) client-side: OpenCV + JPEG + stock image_classifier", server,
                        lambda: run_client_side(server, clip_path)),
                measure("(c) decode-all-then-sample in a handler", server,
                        lambda: run_ours(server, clip, "decode_all")),
            ]
    return report(rows, args, len(clip))


def _one_worker_each(server: TorchServe) -> None:
    """The stock archive asks for 2 workers (the serving benchmark's setting): one here, like the others."""
    requests.put(f"{server.management_url}/models/stock?min_worker=1&max_worker=1&synchronous=true", timeout=120)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, clip_bytes: int) -> int:
    a, b, c = rows
    cpu_ratio = b["total_cpu_s"] / a["total_cpu_s"] if a["total_cpu_s"] else float("inf")
    wall_ratio = b["wall_s"] / a["wall_s"] if a["wall_s"] else float("inf")
    print("\n| way | frames | client CPU s | server CPU s | total CPU s | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['frames']} | {r['client_cpu_s']} | {r['server_cpu_s']} | {r['total_cpu_s']} | "
              f"{r['wall_s']} |")
    print(f"\n(b)/(a): {cpu_ratio:.2f}x CPU-seconds (target >= 3: {'MET' if cpu_ratio >= 3 else 'NOT MET'}), "
          f"{wall_ratio:.2f}x wall time (target >= 2: {'MET' if wall_ratio >= 2 else 'NOT MET'})")
    print(f"(c)/(a): {c['total_cpu_s'] / a['total_cpu_s']:.2f}x CPU-seconds, {c['wall_s'] / a['wall_s']:.2f}x wall time")
    print("server CPU seconds by process during each run (idle workers of the other models included):")
    for r in rows:
        print(f"  {r['label'][:3]} " + ", ".join(f"{k} {v}" for k, v in sorted(r["server_split"].items())))
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "clip": {"seconds": args.seconds, "size": f"{WIDTH}x{HEIGHT}", "fps": FPS, "gop": args.gop, "bytes": clip_bytes},
        "rows": rows,
        "cpu_ratio_b_over_a": round(cpu_ratio, 2),
        "wall_ratio_b_over_a": round(wall_ratio, 2),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
