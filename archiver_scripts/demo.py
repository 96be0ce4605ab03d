"""`tsgpu demo` (`make demo`): a classifier end to end through a real, stock TorchServe.

No pretrained weights can be downloaded here, so the demo trains a toy model in a few seconds: it
names the dominant colour of an image. Its answers are therefore checkable by eye, which random
ImageNet weights would not be. The steps are the ones a user takes with a real model:
train -> `tsgpu compile` (best backend available here, validated against eager) -> `tsgpu archive`
-> `torchserve --start` on the model store -> HTTP requests.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from . import samples
from .archive import build_archive
from .compile import CompileOptions, compile_model
from .server import TorchServe

COLOURS = {
    "red": (220, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (235, 220, 40),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "purple": (140, 40, 170),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def colour_image(rgb: tuple[int, int, int], size: tuple[int, int] = (640, 480), seed: int = 0) -> np.ndarray:
    """A noisy image dominated by `rgb`, with a few rectangles of other colours."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = rgb
    for _ in range(3):
        other = np.array(list(COLOURS.values())[rng.integers(len(COLOURS))], dtype=np.float32)
        x0, y0 = rng.integers(0, w * 3 // 4), rng.integers(0, h * 3 // 4)
        img[y0:y0 + h // 6, x0:x0 + w // 6] = other
    img += rng.normal(0, 18, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def train_colour_model(steps: int = 150, seed: int = 0):
    """A small CNN trained on normalised 224x224 crops; returns it in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    namespace: dict = {}
    exec(compile(COLOUR_MODEL_SOURCE, "colour_model", "exec"), namespace)
    model = namespace["build"]()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    for _ in range(steps):
        labels = rng.integers(0, len(COLOURS), 32)
        base = palette[labels][:, None, None, :] + rng.normal(0, 25, (32, 1, 1, 3))
        x = base + rng.normal(0, 18, (32, 56, 56, 3))
        x = (np.clip(x, 0, 255) / 255.0 - MEAN) / STD
        xt = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
        xt = nn.functional.interpolate(xt, size=224, mode="nearest")
        loss = nn.functional.cross_entropy(model(xt), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


COLOUR_MODEL_SOURCE = '''"""The demo's colour classifier: rebuilt by `tsgpu compile` from these weights."""
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=8, stride=8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    )
'''


def post(url: str, body: bytes, content_type: str) -> tuple[int, object]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        payload = err.read()
        try:
            return err.code, json.loads(payload)
        except ValueError:
            return err.code, payload.decode("utf-8", "replace")


def multipart(field: str, data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run_demo(model_store: Path = Path("model_store"), name: str = "demo_colors") -> int:
    started = time.perf_counter()
    print("== tsgpu demo: a toy colour classifier served by stock TorchServe ==")
    print("   (the model is trained here in seconds to name an image's dominant colour; it is a toy,")
    print("    chosen because no pretrained weights can be downloaded and its answers are checkable)")
    model_store.mkdir(parents=True, exist_ok=True)
    work = model_store / f".{name}-build"
    work.mkdir(exist_ok=True)
    print("[demo] training the colour model on CPU ...")
    import torch

    model = train_colour_model()
    weights = work / "colour_weights.pt"
    torch.save(model.state_dict(), weights)
    source = work / "colour_model.py"
    source.write_text(COLOUR_MODEL_SOURCE)
    print("[demo] tsgpu compile --backend auto (surgery, compile, validation against eager):")
    result = compile_model(
        CompileOptions(model=f"{source}:build", weights=str(weights), output=work / "compiled", name="colors",
                       batch=(1, 4, 8)),
        log=lambda m: print("   " + m),
    )
    chosen = f"{result.meta['backend']} ({result.artifact.name})"
    for reason in result.fallbacks:
        print(f"   fell back past {reason}")
    labels = work / "index_to_name.json"
    labels.write_text(json.dumps({str(i): n for i, n in enumerate(COLOURS)}))
    print("[demo] tsgpu archive:")
    build_archive(name, result.artifact, model_store, labels=labels, batch_size=4, max_batch_delay=5,
                  workers=1, config=["classifier.top_k=3"], force=True, log=lambda m: print("   " + m))

    requests = [
        ("a mostly red image, raw body", samples.encode(colour_image(COLOURS["red"], seed=1)), "application/octet-stream", "raw"),
        ("a mostly blue image, JSON base64", colour_image(COLOURS["blue"], seed=2), "application/json", "json"),
        ("a real photo (coffee cup), multipart form", samples.encode(samples.photos()["coffee"]), None, "multipart"),
        ("a 1080p photo mosaic, raw body", samples.encode(samples.mosaic(1920, 1080)), "application/octet-stream", "raw"),
        ("not an image (bad input on purpose)", b"hello, this is text", "application/octet-stream", "raw"),
    ]
    print("[demo] starting torchserve (stock, loopback only) ...")
    with TorchServe(model_store, models=[f"{name}.mar"]) as server:
        try:
            server.wait_ready([name], timeout=180)
            print(f"[demo] ready at {server.inference_url} after {time.perf_counter() - started:.0f}s")
            print(f"       compile backend chosen: {chosen}")
            for line in (server.log_dir / "model_log.log").read_text().splitlines():
                if "MODEL_LOG - ready:" in line:
                    print("       worker: " + line.split("MODEL_LOG - ", 1)[1].split(", handlers from")[0])
            print("[demo] sending requests:")
            url = f"{server.inference_url}/predictions/{name}"
            for title, payload, ctype, kind in requests:
                if kind == "json":
                    body = json.dumps({"data": base64.b64encode(samples.encode(payload)).decode()}).encode()
                elif kind == "multipart":
                    body, ctype = multipart("data", payload, "coffee.jpg")
                else:
                    body = payload
                status, answer = post(url, body, ctype)
                print(f"  -> {title}: HTTP {status}")
                if isinstance(answer, dict) and "predictions" in answer:
                    for p in answer["predictions"]:
                        print(f"       {p['label']:<8} {p['probability']:.3f}")
                else:
                    print(f"       {answer}")
        finally:
            server.stop()
            server.cleanup()
    print(f"[demo] server stopped; archive kept at {model_store / (name + '.mar')} "
          f"({time.perf_counter() - started:.0f}s in all)")
    print("       serve it again with: tsgpu serve   (config.properties, model_store/)")
    return 0
