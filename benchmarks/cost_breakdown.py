"""Where one worker's CPU goes per 1080p request: JPEG decode, the rest of preprocessing, the model.

Single thread (one worker's share of a 2-core host running 2 workers), MobileNetV3-small
TorchScript as the serving benchmark loads it (frozen, channels-last), batch 8.

    python -m benchmarks.cost_breakdown
"""

from __future__ import annotations

import io
import sys
import time

import torch

from archiver_scripts import samples
from handlers.preprocess import PreprocessSpec
from handlers.preprocess.cpu import CpuPreprocessor


def per_item_ms(fn, n_items: int, repeat: int = 10) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat / n_items * 1000


def main() -> int:
    import torchvision
    from PIL import Image

    torch.set_num_threads(1)
    images = [samples.encode(samples.mosaic(1920, 1080, offset=i), "JPEG", quality=85) for i in range(8)]

    def decode_half() -> None:
        for data in images:
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (960, 540))
            im.load()

    pre = CpuPreprocessor(PreprocessSpec(channels_last=True), threads=1)
    model = torchvision.models.mobilenet_v3_small().eval().to(memory_format=torch.channels_last)
    model = torch.jit.freeze(torch.jit.script(model))
    x = pre.run(images).tensor
    with torch.inference_mode():
        model_ms = per_item_ms(lambda: model(x), len(images))
    decode_ms = per_item_ms(decode_half, len(images))
    pre_ms = per_item_ms(lambda: pre.run(images), len(images))
    print(f"1080p JPEG q85, 1 thread, per image: decode at 1/2 scale {decode_ms:.2f} ms; "
          f"whole CPU preprocess {pre_ms:.2f} ms; MobileNetV3-small at batch 8 {model_ms:.2f} ms; "
          f"handler total about {pre_ms + model_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
