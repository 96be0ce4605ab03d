"""Fuzz the decoders: mutated images through every available preprocess backend, for a bounded time.

Seeds are small valid images in every accepted format and mode; each iteration applies a few
random mutations (bit flips, byte overwrites, truncation, insertion, chunk duplication, huge
dimensions written into the header) and runs the result through each backend. The only allowed
outcomes are a decoded item or a RequestError (a clean 4xx) for that item. Anything else (another
exception type, an item slower than --slow seconds) is a finding: saved with its traceback, and
the script exits 1.

    python fuzz/fuzz_decode.py --seconds 60 [--seed 1] [--save-corpus tests/fuzz_corpus]

--save-corpus keeps a few inputs per distinct outcome, with the outcome expected for each, as
regression cases that tests/unit/test_fuzz_corpus.py replays in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from handlers.errors import RequestError  # noqa: E402
from handlers.preprocess import BACKEND_NAMES, PreprocessSpec, backend_module  # noqa: E402


def seeds() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    out = []

    def save(image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out.append(buf.getvalue())

    save(base, "JPEG", quality=85)
    save(base, "JPEG", quality=85, progressive=True)
    save(base.convert("L"), "JPEG")
    save(base.convert("CMYK"), "JPEG")
    save(base, "PNG")
    save(base.convert("RGBA"), "PNG")
    save(base.convert("P"), "PNG")
    save(Image.frombytes("I;16", base.size, (np.asarray(base.convert("L"), dtype="<u2") * 257).tobytes()), "PNG")
    save(base, "WEBP", quality=80)
    save(base, "WEBP", lossless=True)
    save(base, "GIF")
    save(base, "BMP")
    save(base, "TIFF")
    save(base, "TIFF", compression="tiff_lzw")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(base, "JPEG", exif=exif.tobytes())
    return out


def _huge_dimensions(data: bytearray, rng: random.Random) -> None:
    """Write large width/height into a PNG IHDR or a JPEG SOF marker, if present."""
    big = rng.choice([0, 1, 65535, 30000, 2**31 - 1])
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        data[16:20] = big.to_bytes(4, "big")
        data[20:24] = rng.choice([big, 7]).to_bytes(4, "big")
        return
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0 and i + 9 <= len(data):
            data[i + 5:i + 7] = (big & 0xFFFF).to_bytes(2, "big")
            data[i + 7:i + 9] = (rng.choice([big, 9]) & 0xFFFF).to_bytes(2, "big")
            return


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if not buf:
            break
        if op == 0:  # flip bits
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # overwrite a run
            i = rng.randrange(len(buf))
            n = rng.randint(1, 16)
            buf[i:i + n] = bytes(rng.getrandbits(8) for _ in range(n))
        elif op == 2:  # truncate
            del buf[rng.randrange(len(buf)):]
        elif op == 3:  # insert junk
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif op == 4:  # duplicate a chunk
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i:i + rng.randint(1, 256)]
        elif op == 5:
            _huge_dimensions(buf, rng)
        else:  # keep the header, randomise the rest
            keep = min(len(buf), rng.randint(8, 64))
            buf[keep:] = bytes(rng.getrandbits(8) for _ in range(len(buf) - keep))
    return bytes(buf)


def available_backends(device: torch.device) -> dict:
    out = {}
    for name in BACKEND_NAMES:
        module = backend_module(name)
        if module.availability(device) is None:
            out[name] = module.create(PreprocessSpec(max_image_pixels=20_000_000, device=device), threads=1)
    return out


def outcome_of(backend, data: bytes) -> tuple[str, str]:
    """('ok' or 'CODE type', a coarse message class) for a clean result; raises for anything else."""
    batch = backend.run([data])
    err = batch.errors[0]
    if err is None:
        assert batch.tensor is not None and batch.tensor.shape[0] == 1 and torch.isfinite(batch.tensor).all()
        return "ok", batch.geometry[0].source_format
    assert isinstance(err, RequestError), f"not a RequestError: {err!r}"
    return f"{err.code} {err.type}", re.sub(r"[0-9]+|b'.*'", "N", err.message)[:48]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slow", type=float, default=5.0, help="an item taking longer than this is a finding")
    parser.add_argument("--findings", type=Path, default=Path("fuzz/findings"))
    parser.add_argument("--save-corpus", type=Path, help="directory to keep regression inputs in")
    parser.add_argument("--per-outcome", type=int, default=3, help="corpus inputs kept per distinct outcome")
    parser.add_argument("--device", default="cpu", help="run the backends available on this device (cpu, cuda)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    pool = seeds()
    backends = available_backends(torch.device(args.device))
    print(f"fuzzing backends {list(backends)} with {len(pool)} seeds for {args.seconds:.0f}s (seed {args.seed})", flush=True)
    outcomes: Counter = Counter()
    kept: dict[str, list[tuple[bytes, dict[str, str]]]] = {}
    findings = 0
    iterations = 0
    stop_at = time.monotonic() + args.seconds
    while time.monotonic() < stop_at:
        data = mutate(rng.choice(pool), rng)
        iterations += 1
        results, classes = {}, []
        for name, backend in backends.items():
            t0 = time.perf_counter()
            try:
                results[name], detail = outcome_of(backend, data)
                classes.append(f"{results[name]}: {detail}")
                if time.perf_counter() - t0 > args.slow:
                    raise TimeoutError(f"took {time.perf_counter() - t0:.1f}s")
            except BaseException as exc:  # noqa: BLE001  (everything not clean is a finding)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                findings += 1
                args.findings.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha1(data).hexdigest()[:12]
                (args.findings / f"{name}-{digest}.bin").write_bytes(data)
                (args.findings / f"{name}-{digest}.txt").write_text(traceback.format_exc())
                print(f"FINDING {name}: {type(exc).__name__}: {exc} -> {args.findings}/{name}-{digest}.bin", flush=True)
                results[name] = "finding"
            outcomes[(name, results[name])] += 1
        key = "|".join(sorted(classes)) or "finding"
        if args.save_corpus and len(kept.setdefault(key, [])) < args.per_outcome and "finding" not in key:
            kept[key].append((data, results))
        if len(pool) < 200 and results and all(v == "ok" for v in results.values()) and rng.random() < 0.05:
            pool.append(data)  # mutated-but-valid inputs make good seeds for deeper mutations

    print(f"\n{iterations} inputs in {args.seconds:.0f}s; outcomes per backend:")
    for (name, result), n in sorted(outcomes.items()):
        print(f"  {name:<10} {result:<32} {n}")
    if args.save_corpus:
        args.save_corpus.mkdir(parents=True, exist_ok=True)
        index_path = args.save_corpus / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        for items in kept.values():
            for data, results in items:
                name = hashlib.sha1(data).hexdigest()[:16] + ".bin"
                (args.save_corpus / name).write_bytes(data)
                index[name] = results
        index_path.write_text(json.dumps(dict(sorted(index.items())), indent=1))
        print(f"corpus: {len(index)} inputs in {args.save_corpus}")
    print(f"findings: {findings}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
