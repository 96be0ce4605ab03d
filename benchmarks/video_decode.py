"""Micro-benchmark of the video decode room: CPU-seconds of probing and decoding one clip's sampled frames.

What the decode process does for one request, in this process (no server, no worker, no model): `probe`
(demux the frame table, decode the first frame), open the decoder, decode the plan's frames chunk by chunk
into a [frame_batch, 3, H, W] uint8 buffer. Reports per decoder: CPU seconds (every thread of this
process, time.process_time), wall seconds, frames FFmpeg decoded (PyAV; torchcodec: the planner's count),
for each stage. The clip is benchmarks/video.py's (60 s 1080p30 H.264, x264 veryfast: B-frames, keyint
--gop), written to --clip on the first run and reused after.

    python -m benchmarks.video_decode [--clip /tmp/clip_g60.mp4] [--seconds 60] [--gop 60] [--fps 1]
                                      [--decoders pyav torchcodec] [--repeat 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from handlers.video.config import SamplingConfig, VideoConfig
from handlers.video.probe import probe
from handlers.video.sampling import decode_cost, make_plan


def run_once(data: bytes, backend: str, cfg: VideoConfig, sampling: SamplingConfig, frame_batch: int) -> dict[str, Any]:
    """One request's decode-process work; CPU and wall seconds per stage."""
    marks: list[tuple[str, float, float]] = [("start", time.process_time(), time.perf_counter())]
    info, table, damaged = probe(data, cfg)
    marks.append(("probe", time.process_time(), time.perf_counter()))
    decoder: Any
    if backend == "torchcodec":
        from handlers.video.torchcodec import TorchCodecDecoder

        decoder = TorchCodecDecoder(data, table, info.rotation, cfg.max_decoded_frames, device="cpu",
                                    threads=cfg.decode_threads, damaged=damaged, displayed=(info.width, info.height))
    else:
        from handlers.video.pyav import PyAVDecoder

        decoder = PyAVDecoder(data, table, info.rotation, cfg.max_decoded_frames, threads=cfg.decode_threads,
                              damaged=damaged)
    marks.append(("open", time.process_time(), time.perf_counter()))
    plan = make_plan(table, sampling, cfg.max_sampled_frames)
    out = np.empty((frame_batch, 3, info.height, info.width), dtype=np.uint8)
    got: list[int] = []
    for at in range(0, plan.count, frame_batch):
        got += decoder.decode_into(list(plan.indices[at:at + frame_batch]), out)
    decoder.close()
    marks.append(("decode", time.process_time(), time.perf_counter()))
    stages = {name: (round(c - marks[i][1], 3), round(w - marks[i][2], 3)) for i, (name, c, w) in enumerate(marks[1:])}
    return {"backend": backend, "frames": len(got), "planned": plan.count, "decoded": decoder.decoded,
            "returned": getattr(decoder, "returned", decoder.decoded),
            "walk": decode_cost(table, plan.indices), "cpu_s": round(marks[-1][1] - marks[0][1], 3),
            "wall_s": round(marks[-1][2] - marks[0][2], 3), "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=Path("/tmp/video_decode_bench.mp4"))
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--gop", type=int, default=60)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--decoders", nargs="+", default=["pyav", "torchcodec"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="handler.video.decode_threads (0: the decoder's choice)")
    parser.add_argument("--frame-batch", type=int, default=16)
    parser.add_argument("--thread-type", default=None, help="PyAV: SLICE, FRAME or AUTO (default: pyav.THREAD_TYPE)")
    parser.add_argument("--no-skip", action="store_true", help="PyAV: decode non-reference frames too")
    args = parser.parse_args(argv)
    from handlers.video import pyav

    if args.thread_type:
        pyav.THREAD_TYPE = args.thread_type
    if args.no_skip:
        pyav.SKIP_NONREF = False
    if not args.clip.is_file():
        from benchmarks.video import make_clip

        print(f"encoding {args.seconds} s 1080p30 H.264 keyint {args.gop} into {args.clip} ...", flush=True)
        args.clip.write_bytes(make_clip(args.seconds, args.gop))
    data = args.clip.read_bytes()
    cfg = VideoConfig(decode_threads=args.threads)
    sampling = SamplingConfig(mode="fps", fps=args.fps)
    print(f"{args.clip} ({len(data) / 1e6:.1f} MB), fps {args.fps}, threads {args.threads}, "
          f"pyav thread type {pyav.THREAD_TYPE}, skip non-ref {pyav.SKIP_NONREF}, "
          f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}", flush=True)
    for backend in args.decoders:
        run_once(data, backend, cfg, sampling, args.frame_batch)  # warm: imports, first allocation
        runs = [run_once(data, backend, cfg, sampling, args.frame_batch) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["cpu_s"])
        print(f"{backend}: cpu_s min {best['cpu_s']} (all {[r['cpu_s'] for r in runs]}), wall_s {best['wall_s']}, "
              f"frames {best['frames']}/{best['planned']}, walked {best['decoded']} (planned {best['walk']}), "
              f"FFmpeg decoded {best['returned']}, "
              f"stages (cpu, wall) {best['stages']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
