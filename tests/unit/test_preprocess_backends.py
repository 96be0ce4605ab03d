"""Accelerated preprocess backends (torchvision, dali, cvcuda): the output contract, fault isolation,
selection and lazy imports.

Every case runs on each backend on the CPU where the backend can run there (torchvision with
libjpeg-turbo, DALI as a CPU pipeline) and, marked `gpu`, on CUDA. DALI must be installed where
TSGPU_REQUIRE_DALI=1 (CI sets it), so a missing install fails instead of skipping.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from archiver_scripts import samples
from handlers.errors import ConfigError, InvalidInput, UnsupportedMediaType
from handlers.preprocess import PreprocessSpec, resolve_backend
from handlers.preprocess.cpu import CpuPreprocessor
from tests.helpers import (
    CPU_MAX_TOL,
    CPU_MEAN_TOL,
    GPU_MAX_TOL,
    GPU_MEAN_TOL,
    bad_and_odd_items,
    dali_or_skip,
    exif_rotated,
    make,
    photo_jpegs,
)
from tests.reference import reference_tensor

ON_CPU = ["torchvision", "dali"]

CASES = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in ON_CPU] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in ["torchvision", "dali", "cvcuda"]
]


@pytest.fixture(scope="module")
def jpegs():
    return photo_jpegs()


def tolerance(device: str) -> tuple[float, float]:
    return (CPU_MEAN_TOL, CPU_MAX_TOL) if device == "cpu" else (GPU_MEAN_TOL, GPU_MAX_TOL)


@pytest.mark.parametrize("backend,device", CASES)
def test_output_contract_on_real_photos(backend, device, jpegs):
    pre = make(backend, device)
    names = list(jpegs)
    batch = pre.run([jpegs[n] for n in names])
    assert batch.rows == list(range(len(names))) and all(e is None for e in batch.errors)
    x = batch.tensor
    assert x.shape == (len(names), 3, 224, 224) and x.dtype == torch.float32
    assert x.device.type == device
    mean_tol, max_tol = tolerance(device)
    for k, name in enumerate(names):
        diff = (x[k].cpu() - reference_tensor(jpegs[name])).abs()
        print(f"{backend}-{device} {name}: mean abs diff {diff.mean():.5f}, max {diff.max():.4f}")
        assert diff.mean().item() < mean_tol, name
        assert diff.max().item() < max_tol, name
    assert pre.fallback_items == 0, "valid RGB JPEGs must not take the CPU path"


@pytest.mark.parametrize("backend,device", CASES)
def test_geometry_and_exif_orientation_match_the_cpu_backend(backend, device, jpegs):
    items = [exif_rotated(turn) for turn in (1, 3, 6, 8)] + [jpegs["portrait"], jpegs["small"]]
    pre = make(backend, device)
    cpu = CpuPreprocessor(PreprocessSpec(jpeg_draft=False), 1)
    ours, theirs = pre.run(items), cpu.run(items)
    assert ours.geometry == theirs.geometry
    mean_tol, max_tol = tolerance(device)
    for k, data in enumerate(items):
        diff = (ours.tensor[k].cpu() - reference_tensor(data)).abs()
        assert diff.mean().item() < mean_tol and diff.max().item() < max_tol, k
    rotated = ours.geometry[2]
    assert rotated.original_size == (512, 384) and rotated.source_format == "JPEG"


@pytest.mark.parametrize("backend,device", CASES)
def test_bad_items_fail_alone_and_the_batch_succeeds(backend, device):
    items = bad_and_odd_items()
    pre = make(backend, device)
    batch = pre.run(list(items.values()))
    by_name = dict(zip(items, batch.errors, strict=True))
    assert isinstance(by_name["truncated"], InvalidInput) and by_name["truncated"].code == 400
    assert isinstance(by_name["truncated_tail"], InvalidInput)
    assert isinstance(by_name["text"], UnsupportedMediaType) and by_name["text"].code == 415
    ok = [n for n in items if by_name[n] is None]
    assert ok == ["good", "cmyk_jpeg", "gif", "png", "good_again"]
    names = list(items)
    assert batch.rows == [names.index(n) for n in ok]
    mean_tol, max_tol = tolerance(device)
    for row, name in zip(batch.rows, ok, strict=True):
        diff = (batch.tensor[batch.rows.index(row)].cpu() - reference_tensor(items[name])).abs()
        assert diff.mean().item() < mean_tol and diff.max().item() < max_tol, name
    # CMYK and GIF are outside every GPU decoder here: they took the CPU path and were uploaded.
    assert pre.fallback_items >= 2
    # The backend keeps working after a failing batch (DALI rebuilds its pipeline).
    again = pre.run([items["good"], items["png"]])
    assert again.rows == [0, 1]


def test_dali_rebuilds_and_isolates_the_sample_it_fails():
    items = bad_and_odd_items()
    pre = make("dali")
    batch = pre.run([items["good"], items["truncated"], items["good_again"], items["truncated_tail"]])
    assert batch.rows == [0, 2]
    assert pre.rebuilds == 2  # one per truncated JPEG, which DALI names in its error
    assert pre.failed_batches == 0  # the good items stayed on DALI
    assert pre.fallback_items == 2


@pytest.mark.parametrize("backend,device", CASES)
def test_layout_dtype_and_batches_larger_than_max_batch(backend, device, jpegs):
    pre = make(backend, device, max_batch=2, channels_last=True, dtype=torch.float16)
    items = [jpegs["chelsea"], jpegs["coffee"], jpegs["rocket"], jpegs["small"], jpegs["1080p"]]
    batch = pre.run(items)
    x = batch.tensor
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float16
    assert x.is_contiguous(memory_format=torch.channels_last)
    reference = CpuPreprocessor(PreprocessSpec(jpeg_draft=False), 1).run(items).tensor
    assert (x.float().cpu() - reference).abs().mean().item() < tolerance(device)[0] + 2e-3


@pytest.mark.parametrize("backend", ON_CPU)
def test_bfloat16_and_bicubic(backend, jpegs):
    pre = make(backend, dtype=torch.bfloat16, interpolation="bicubic")
    x = pre.run([jpegs["astronaut"]]).tensor
    assert x.dtype == torch.bfloat16
    from torchvision import transforms as T

    image = Image.open(io.BytesIO(jpegs["astronaut"])).convert("RGB")
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                     T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    assert (x[0].float() - ref).abs().mean().item() < 0.02


def test_auto_takes_the_cpu_backend_on_a_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_cvcuda_on_a_cpu_fails_with_the_reason():
    with pytest.raises(ConfigError, match="CV-CUDA needs a CUDA device"):
        resolve_backend("cvcuda", torch.device("cpu"))


def test_a_missing_optional_dependency_fails_with_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise
    with pytest.raises(ConfigError, match=r"'dali' cannot run here: .*pip install 'torchserve-gpu-handlers\[dali\]'"):
        resolve_backend("dali", torch.device("cpu"))


def test_importing_the_library_loads_no_optional_backend_and_no_cuda():
    code = (
        "import sys, torch, handlers.preprocess as p, handlers.image_classifier;"
        "import handlers.preprocess.torchvision_gpu, handlers.preprocess.dali, handlers.preprocess.cvcuda;"
        "loaded = [m for m in ('nvidia.dali', 'cvcuda', 'nvidia.nvimgcodec') if m in sys.modules];"
        "assert not loaded, loaded;"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("backend", ON_CPU)
def test_handler_uses_the_backend_named_in_model_config(model_dir, backend):
    from handlers.image_classifier import ImageClassifier
    from handlers.testing import FakeContext, raw_request, run_handler

    if backend == "dali":
        dali_or_skip()
    context = FakeContext(model_dir, serialized_file="model_ep.pt2", batch_size=4,
                          handler_config={"preprocess": {"backend": backend}})
    handler = ImageClassifier()
    handler.initialize(context)
    assert handler.preprocessor.name == backend
    photo = samples.encode(samples.photos()["chelsea"], "JPEG")
    responses = run_handler(handler, context, [raw_request(photo), raw_request(b"nope"), raw_request(photo)])
    assert [r.status for r in responses] == [200, 415, 200]
    assert responses[0].body == responses[2].body and responses[0].body["predictions"]
    gif = samples.encode(samples.photos()["coffee"], "GIF")  # no GPU decoder here takes GIF
    run_handler(handler, context, [raw_request(gif), raw_request(photo)])
    fallbacks = [c.value for c in context.metrics.calls if c.name == "PreprocessFallbacks"]
    assert fallbacks == [1]
    handler.preprocessor.close()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torchvision", "dali", "cvcuda"])
def test_gpu_backend_runs_on_the_current_stream(backend, jpegs):
    """Work goes on the stream the model uses: results read on a side stream after wait_stream."""
    pre = make(backend, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        batch = pre.run([jpegs["1080p"], jpegs["4k"]])
        ready = batch.tensor.sum()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.isfinite(ready).item()
    assert np.isclose(ready.item(), batch.tensor.sum().item(), rtol=1e-4)


def _png_with_exif_after_idat(orientation_value: int) -> bytes:
    """A PNG whose eXIf chunk follows the pixels (allowed by the spec): Pillow sees it only on load."""
    import zlib as _zlib

    image = Image.fromarray(np.full((20, 30, 3), 90, np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation_value
    body = exif.tobytes()
    chunk = len(body).to_bytes(4, "big") + b"eXIf" + body + (_zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF).to_bytes(4, "big")
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def test_planning_a_png_reads_chunk_headers_not_pixels(monkeypatch):
    from PIL import PngImagePlugin

    from handlers.preprocess.accelerated import plan_item, png_has_exif

    plain = samples.encode(samples.mosaic(64, 48), "PNG")
    late = _png_with_exif_after_idat(6)
    loads = []
    original = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or original(self))
    spec = PreprocessSpec()
    assert not png_has_exif(plain) and png_has_exif(late)
    assert plan_item(plain, spec).orientation == 1 and loads == []  # no decode to plan it
    plan = plan_item(late, spec)  # eXIf behind the pixels: Pillow has to load to find it
    assert plan.orientation == 6 and plan.geometry.original_size == (20, 30)
