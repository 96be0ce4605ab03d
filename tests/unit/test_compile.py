"""`tsgpu compile`: export / aoti / eager for real on CPU, the cache, metadata, artifact choice at load."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from archiver_scripts.archive import build_archive
from archiver_scripts.compile import CompileError, CompileOptions, cache_key, compile_model
from handlers.artifacts import (
    ArtifactInfo, choose, cpu_flags, cpu_requirements, device_info, library_versions, native_cpu_precision, refusal,
)
from handlers.errors import ModelLoadError
from handlers.image_classifier import ImageClassifier
from handlers.testing import FakeContext, raw_request, run_handler
from archiver_scripts import samples
from tests import models

ROOT = Path(__file__).resolve().parents[2]

MODEL = "tests/tiny_model.py:TinyClassifier"


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "weights.pt"
    torch.save(models.make_model().state_dict(), path)
    return path


def opts(tmp_path, weights, **kw) -> CompileOptions:
    base = dict(model=MODEL, weights=str(weights), output=tmp_path / "out", batch=(1, 4, 8),
                cache_dir=tmp_path / "cache", name="tiny")
    base.update(kw)
    return CompileOptions(**base)


def test_export_backend_metadata_and_validation(tmp_path, weights):
    result = compile_model(opts(tmp_path, weights, backend="export"), log=quiet)
    assert result.artifact.name == "tiny.export-cpu.pt2" and result.artifact.is_file()
    meta = json.loads((tmp_path / "out" / "tiny.export-cpu.pt2.json").read_text())
    assert meta["backend"] == "export" and meta["artifact_format"] == "exported_program"
    assert meta["input"] == {"shape": [3, 224, 224], "dtype": "float32", "batch": {"min": 1, "opt": 4, "max": 8}, "channels_last": False}
    assert meta["device"]["type"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert meta["device"]["capability"] == cpu_requirements("native") and meta["device"]["target"] == "native"
    assert len(meta["weight_hash"]) == 64
    assert meta["validation"]["passed"] and meta["validation"]["batch_sizes"] == [1, 4, 8]
    assert meta["validation"]["max_abs_diff"] < 1e-3
    assert [s["name"] for s in meta["surgery"]][:4] == ["eval", "remove_weight_reparametrizations", "drop_dropout", "fold_batchnorm"]
    program = torch.export.load(str(result.artifact)).module()
    x = torch.randn(6, 3, 224, 224)
    with torch.inference_mode():
        assert (program(x) - models.make_model()(x)).abs().max().item() < 1e-3  # dynamic batch works


@pytest.mark.slow
def test_aoti_backend_and_cache_hit(tmp_path, weights):
    t0 = time.perf_counter()
    first = compile_model(opts(tmp_path, weights, backend="aoti"), log=quiet)
    built = time.perf_counter() - t0
    assert first.meta["cache"]["hit"] is False and first.meta["validation"]["passed"]
    t0 = time.perf_counter()
    second = compile_model(opts(tmp_path, weights, backend="aoti", output=tmp_path / "out2"), log=quiet)
    again = time.perf_counter() - t0
    assert second.meta["cache"] == {"hit": True, "key": first.meta["cache"]["key"]}
    assert again < built  # a hit copies and re-validates; it does not rebuild
    # another input spec or precision is another key: never reused
    third = compile_model(opts(tmp_path, weights, backend="aoti", batch=(1, 4, 16), output=tmp_path / "out3"), log=quiet)
    assert third.meta["cache"]["hit"] is False and third.meta["cache"]["key"] != first.meta["cache"]["key"]


def test_eager_backend_packs_the_model_code(tmp_path, weights):
    result = compile_model(opts(tmp_path, weights, backend="eager"), log=quiet)
    assert result.artifact.name == "tiny.eager-cpu.pt"
    assert result.meta["model_class"] == "tiny_model.py:TinyClassifier"
    assert (tmp_path / "out" / "tiny_model.py").is_file()


def test_eager_backend_at_reduced_precision_compiles_and_serves(tmp_path, weights):
    """--backend eager --precision bf16: validated against the fp32 model (which must stay fp32),
    and the handler runs the fp32 weights it packs in bf16, as the metadata says."""
    from handlers.backbone import load_backbone
    from handlers.config import ModelConfig

    result = compile_model(opts(tmp_path, weights, backend="eager", precision="bf16"), log=quiet)
    assert result.meta["validation"]["passed"] and result.meta["input"]["dtype"] == "bfloat16"
    bb = load_backbone(result.artifact.parent, result.artifact.name, ModelConfig(), torch.device("cpu"))
    assert bb.format == "eager" and bb.dtype == torch.bfloat16
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = bb(x.to(bb.dtype))
        ref = models.make_model()(x)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 0.08 * ref.abs().max().item()


def test_tensorrt_without_cuda_fails_clearly(tmp_path, weights):
    with pytest.raises(CompileError, match="tensorrt: CompileError: TensorRT needs a CUDA device"):
        compile_model(opts(tmp_path, weights, backend="tensorrt"), log=quiet)


def test_auto_reports_fallbacks(tmp_path, weights, monkeypatch):
    import archiver_scripts.compile as c

    def broken(*args, **kwargs):
        raise RuntimeError("simulated inductor failure")

    monkeypatch.setitem(c.BUILDERS, "aoti", broken)
    lines = []
    result = compile_model(opts(tmp_path, weights), log=lines.append)
    assert result.meta["backend"] == "export"
    assert result.fallbacks == ["aoti: RuntimeError: simulated inductor failure"]
    assert any("fallback: aoti" in line for line in lines)


@pytest.mark.parametrize("kw,fragment", [
    (dict(batch=(4, 2, 8)), "need 1 <= min <= opt <= max"),
    (dict(precision="fp8"), "--precision 'fp8'"),
    (dict(backend="onnx"), "--backend 'onnx'"),
    (dict(model="nowhere.py:Net"), "nowhere.py does not exist"),
    (dict(model="torchvision:not_a_model"), "torchvision:not_a_model"),
])
def test_bad_options(tmp_path, weights, kw, fragment):
    with pytest.raises(CompileError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        compile_model(opts(tmp_path, weights, **kw), log=quiet)


def _info(backend, device_type="cpu", capability=None, torch_version=None, **extra):
    versions = dict(library_versions())
    if torch_version:
        versions["torch"] = torch_version
    meta = {"backend": backend, "device": {"type": device_type, "capability": capability}, "versions": versions}
    meta.update(extra)  # e.g. device={...} replaces the default
    return ArtifactInfo(f"m.{backend}-{device_type}.pt2", meta)


def test_artifact_choice_on_cpu():
    cpu = torch.device("cpu")
    candidates = [_info("tensorrt", "cuda", [9, 0]), _info("aoti", "cuda", [8, 0]), _info("export"), _info("aoti")]
    best, lines = choose(candidates, cpu)
    assert best.backend == "aoti" and best.meta["device"]["type"] == "cpu"
    assert "refused: built for cuda, this worker runs on cpu" in lines[0]
    assert lines[2].endswith("fits") and lines[3].endswith("fits")
    stale = _info("aoti", torch_version="2.3.0")
    assert "built with torch 2.3" in refusal(stale, cpu, library_versions())
    with pytest.raises(ModelLoadError, match="no artifact in this archive can run on cpu"):
        choose([_info("tensorrt", "cuda", [9, 0]), stale], cpu)


def test_cpu_package_built_for_missing_instructions_is_refused(monkeypatch):
    """An AOTInductor package holds machine code built with -march=native: loading one built on an
    AVX-512 host on a CPU without AVX-512 would kill the worker with SIGILL."""
    cpu = torch.device("cpu")
    built = {"type": "cpu", "arch": "x86_64", "target": "native", "capability": ["avx2", "avx512f", "avx512_bf16"]}
    aoti = _info("aoti", device=built)
    export = _info("export", device=built)  # portable: no machine code inside
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr("handlers.artifacts.cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "hypervisor"})
    assert refusal(aoti, cpu, library_versions()) is None
    monkeypatch.setattr("handlers.artifacts.cpu_flags", lambda: {"avx2", "fma"})
    reason = refusal(aoti, cpu, library_versions())
    assert reason and "(avx512_bf16, avx512f)" in reason and "--cpu-target x86-64-v3" in reason
    best, lines = choose([aoti, export], cpu)
    assert best.backend == "export" and "illegal instruction" in lines[0]
    other_arch = _info("aoti", device={"type": "cpu", "arch": "aarch64", "capability": ["asimd"]})
    assert refusal(other_arch, cpu, library_versions()) == "built for aarch64, this host is x86_64"
    legacy = _info("aoti")  # metadata from before the instruction set was recorded: accepted as before
    assert refusal(legacy, cpu, library_versions()) is None
    monkeypatch.setattr("handlers.artifacts.cpu_flags", lambda: None)  # no /proc/cpuinfo: cannot tell
    assert refusal(aoti, cpu, library_versions()) is None


def _disassembly(package, tmp_path) -> str:
    import subprocess
    import zipfile

    out = tmp_path / package.stem
    zipfile.ZipFile(package).extractall(out)
    libs = sorted(out.rglob("*.so"))
    assert libs, "an AOTInductor CPU package holds a shared library"
    return "".join(subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
                   for lib in libs)


# Registers only AVX-512 (EVEX) code can name: zmm, the upper 16 xmm/ymm, the mask registers k1-k7.
_AVX512_REGISTER = re.compile(r"%zmm\d+|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b")

_RUN_PACKAGE = """
import sys, torch
sys.path.insert(0, {root!r})
from tests import models
from handlers.artifacts import ArtifactInfo, library_versions, refusal
from pathlib import Path
path = Path({path!r})
print("capability", torch.backends.cpu.get_cpu_capability(), flush=True)
print("refusal", refusal(ArtifactInfo.read(path), torch.device("cpu"), library_versions()), flush=True)
package = torch._inductor.aoti_load_package(str(path))  # loaded even when refused: what would happen
x = torch.randn(3, 3, 224, 224)
with torch.inference_mode():
    print("diff", (package(x) - models.make_model()(x)).abs().max().item(), flush=True)
"""


def _run_package(package, tmp_path, prefix=(), env=None):
    """Load and run `package` in a fresh process (under `prefix`, e.g. an emulator): its return code,
    the `capability` / `refusal` / `diff` lines it printed, and its stdout and stderr."""
    import resource
    import subprocess

    out = subprocess.run(
        [*prefix, sys.executable, "-c", _RUN_PACKAGE.format(root=str(ROOT), path=str(package))],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    return out.returncode, lines, out.stdout, out.stderr


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("objdump"), reason="x86-64 with binutils only")
def test_cpu_target_x86_64_v3_builds_avx2_code(tmp_path, weights):
    """--cpu-target x86-64-v3: the package holds no AVX-512 instruction, records the AVX2 level,
    is accepted by a host with exactly that level, and serves correctly with torch and oneDNN held
    to AVX2. (What an AVX2-only CPU would do with the code is shown by the disassembly, not by
    running it: this host's CPU would execute AVX-512 instructions without complaint.)"""
    v3 = compile_model(opts(tmp_path, weights, backend="aoti", cpu_target="x86-64-v3", output=tmp_path / "v3"), log=quiet)
    assert v3.meta["device"]["target"] == "x86-64-v3" and "avx2" in v3.meta["device"]["capability"]
    assert "avx512f" not in v3.meta["device"]["capability"] and v3.meta["validation"]["passed"]
    code = _disassembly(v3.artifact, tmp_path)
    assert "%ymm" in code and not _AVX512_REGISTER.search(code)
    if "avx512f" in (cpu_flags() or set()):  # on an AVX-512 host the default build does use it
        native = compile_model(opts(tmp_path, weights, backend="aoti", output=tmp_path / "native"), log=quiet)
        assert _AVX512_REGISTER.search(_disassembly(native.artifact, tmp_path))
        assert native.meta["cache"]["key"] != v3.meta["cache"]["key"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code, lines, _out, err = _run_package(v3.artifact, tmp_path, env=env)
    assert code == 0, err[-2000:]
    assert lines["capability"] == "AVX2" and float(lines["diff"]) < 1e-3
    import handlers.artifacts as artifacts
    avx2_host = set(v3.meta["device"]["capability"])
    original = artifacts.cpu_flags
    try:
        artifacts.cpu_flags = lambda: avx2_host
        assert refusal(ArtifactInfo.read(v3.artifact), torch.device("cpu"), library_versions()) is None
    finally:
        artifacts.cpu_flags = original


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("qemu-x86_64"),
                    reason="needs qemu-x86_64 (apt-get install qemu-user) to emulate a CPU without AVX-512")
def test_packages_on_an_emulated_avx2_cpu(tmp_path, weights):
    """On a CPU without AVX-512 (Haswell, emulated by qemu-user: its TCG has no AVX-512): the
    x86-64-v3 package is accepted and serves correctly; a native package built on an AVX-512 host is
    refused by the handler's check, and loading it anyway dies with an illegal instruction."""
    haswell = ("qemu-x86_64", "-cpu", "Haswell-v4")
    v3 = compile_model(opts(tmp_path, weights, backend="aoti", cpu_target="x86-64-v3", output=tmp_path / "v3"), log=quiet)
    code, lines, _out, err = _run_package(v3.artifact, tmp_path, haswell)
    assert code == 0, err[-2000:]
    assert lines["capability"] == "AVX2" and lines["refusal"] == "None" and float(lines["diff"]) < 1e-3
    if "avx512f" not in (cpu_flags() or set()):
        pytest.skip("this host has no AVX-512: its native package would run on Haswell too")
    native = compile_model(opts(tmp_path, weights, backend="aoti", output=tmp_path / "native"), log=quiet)
    code, lines, out, err = _run_package(native.artifact, tmp_path, haswell)
    assert "illegal instruction" in out and "avx512f" in out  # the refusal names what is missing
    assert code in (-4, 132), (code, err[-2000:])  # SIGILL
    assert "diff" not in lines


@pytest.mark.parametrize("target, fragment", [("pentium", "unknown CPU target"), ("x86-64-v4", "unknown CPU target")])
def test_bad_cpu_target(tmp_path, weights, target, fragment):
    with pytest.raises(CompileError, match=fragment):
        compile_model(opts(tmp_path, weights, backend="aoti", cpu_target=target), log=quiet)


def test_cpu_target_needs_a_host_that_can_run_it(tmp_path, weights, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr("handlers.artifacts.cpu_flags", lambda: {"sse4_2", "avx"})  # an old CPU
    with pytest.raises(CompileError, match="cannot run \\(and validate\\) x86-64-v3 code"):
        compile_model(opts(tmp_path, weights, backend="aoti", cpu_target="x86-64-v3"), log=quiet)
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    with pytest.raises(CompileError, match="applies to Linux x86-64 hosts"):
        compile_model(opts(tmp_path, weights, backend="aoti", cpu_target="x86-64-v3"), log=quiet)


def test_cache_key_separates_cpu_targets(tmp_path, weights):
    cpu = torch.device("cpu")
    native, v3 = device_info(cpu, "native"), device_info(cpu, "x86-64-v3")
    versions = library_versions()
    keys = {cache_key("w", opts(tmp_path, weights, backend="aoti", cpu_target=t), "aoti", d, versions)
            for t, d in (("native", native), ("x86-64-v3", v3))}
    assert len(keys) == 2
    # the target alone separates keys, even where the recorded flags happened to coincide
    same = {cache_key("w", opts(tmp_path, weights, backend="aoti", cpu_target=t), "aoti", v3, versions)
            for t in ("native", "x86-64-v3")}
    assert len(same) == 2


def test_native_precision_and_the_emulation_warning(tmp_path, weights, monkeypatch):
    monkeypatch.setattr("handlers.artifacts.cpu_flags", lambda: {"avx2", "avx512f", "avx512bw"})  # Skylake-SP-like
    assert native_cpu_precision("fp32") and not native_cpu_precision("bf16") and not native_cpu_precision("fp16")
    lines: list[str] = []
    compile_model(opts(tmp_path, weights, backend="export", precision="bf16"), log=lines.append)
    assert any("no native bf16" in line and "slower than fp32" in line for line in lines)
    monkeypatch.setattr("handlers.artifacts.cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert native_cpu_precision("bf16")
    lines.clear()
    compile_model(opts(tmp_path, weights, backend="export", precision="bf16", output=tmp_path / "o2"), log=lines.append)
    assert not any("warning" in line for line in lines)


def test_archive_with_several_artifacts_loads_the_best_fit(tmp_path, weights):
    out = tmp_path / "out"
    compile_model(opts(tmp_path, weights, backend="export"), log=quiet)
    compile_model(opts(tmp_path, weights, backend="eager"), log=quiet)
    # an artifact for a GPU this host does not have
    gpu = out / "tiny.aoti-cuda.pt2"
    shutil.copyfile(out / "tiny.export-cpu.pt2", gpu)
    meta = json.loads((out / "tiny.export-cpu.pt2.json").read_text())
    meta.update(backend="aoti", artifact_format="aoti", file=gpu.name, device={"type": "cuda", "name": "H100", "capability": [9, 0]})
    (out / "tiny.aoti-cuda.pt2.json").write_text(json.dumps(meta))
    labels = models.write_labels(tmp_path)
    mar = build_archive("multi", [gpu, out / "tiny.export-cpu.pt2", out / "tiny.eager-cpu.pt"], tmp_path / "store",
                        labels=labels, batch_size=4, log=quiet)
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(mar, unpacked, "zip")
    import yaml

    cfg = yaml.safe_load((unpacked / "model-config.yaml").read_text())
    assert cfg["handler"]["model"] == {"artifacts": ["tiny.aoti-cuda.pt2", "tiny.export-cpu.pt2", "tiny.eager-cpu.pt"]}
    ctx = FakeContext(unpacked, serialized_file="tiny.aoti-cuda.pt2", handler_config=cfg["handler"], batch_size=4,
                      model_yaml_config={"maxWorkers": 1})
    handler = ImageClassifier()
    handler.initialize(ctx)
    assert handler.backbone.info.backend == "export" and handler.backbone.format == "exported_program"
    (r,) = run_handler(handler, ctx, [raw_request(samples.encode(samples.photos()["chelsea"]))])
    assert r.status == 200


def test_batch_size_beyond_artifact_max_fails_load(tmp_path, weights):
    result = compile_model(opts(tmp_path, weights, backend="export"), log=quiet)
    ctx = FakeContext(result.artifact.parent, serialized_file=result.artifact.name, handler_config={}, batch_size=16,
                      model_yaml_config={"maxWorkers": 1})
    with pytest.raises(ModelLoadError, match="batchSize 16 exceeds the artifact's max batch 8"):
        ImageClassifier().initialize(ctx)


def test_single_artifact_for_another_device_is_refused(tmp_path, weights):
    result = compile_model(opts(tmp_path, weights, backend="export"), log=quiet)
    meta_path = result.artifact.with_name(result.artifact.name + ".json")
    meta = json.loads(meta_path.read_text())
    meta.update(backend="aoti", device={"type": "cuda", "capability": [9, 0]})
    meta_path.write_text(json.dumps(meta))
    ctx = FakeContext(result.artifact.parent, serialized_file=result.artifact.name, handler_config={}, batch_size=4)
    with pytest.raises(ModelLoadError, match="cannot run on this worker: built for cuda"):
        ImageClassifier().initialize(ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_on_gpu(tmp_path, weights, precision):
    pytest.importorskip("torch_tensorrt", reason="torch-tensorrt not installed")
    result = compile_model(opts(tmp_path, weights, backend="tensorrt", device="cuda", precision=precision), log=quiet)
    meta = result.meta
    assert meta["backend"] == "tensorrt" and meta["validation"]["passed"]
    assert meta["device"]["capability"] == list(torch.cuda.get_device_capability())
    assert meta["versions"]["tensorrt"] and meta["versions"]["torch_tensorrt"]
    again = compile_model(opts(tmp_path, weights, backend="tensorrt", device="cuda", precision=precision,
                               output=tmp_path / "again"), log=quiet)
    assert again.meta["cache"]["hit"] is True


@pytest.mark.gpu
def test_aoti_on_gpu_is_chosen_over_cpu_artifact(tmp_path, weights):
    gpu = compile_model(opts(tmp_path, weights, backend="aoti", device="cuda"), log=quiet)
    cpu = compile_model(opts(tmp_path, weights, backend="export"), log=quiet)
    best, _ = choose([ArtifactInfo.read(cpu.artifact), ArtifactInfo.read(gpu.artifact)], torch.device("cuda", 0))
    assert best.backend == "aoti"


def test_static_batch_artifact_pads_smaller_batches(tmp_path, weights):
    """`--batch 4,4,4` compiles for exactly 4 rows; the backbone pads 1..3 rows up and keeps theirs."""
    from handlers.backbone import load_backbone
    from handlers.config import ModelConfig

    result = compile_model(opts(tmp_path, weights, backend="export", batch=(4, 4, 4)), log=quiet)
    backbone = load_backbone(result.artifact.parent, result.artifact.name, ModelConfig(), torch.device("cpu"))
    assert backbone.min_batch == 4 and backbone.max_batch == 4
    reference = models.make_model()
    for n in (1, 3, 4):
        x = torch.randn(n, 3, 224, 224)
        with torch.inference_mode():
            out = backbone(x)
            assert out.shape[0] == n
            assert (out - reference(x)).abs().max().item() < 1e-3
    with pytest.raises(Exception):  # more rows than compiled for: the artifact refuses them
        with torch.inference_mode():
            backbone(torch.randn(5, 3, 224, 224))


# Signatures of torch_tensorrt 2.14.0's entry points as that wheel declares them (read from its
# source; TensorRT itself cannot be installed on a host without the NVIDIA index and a GPU), and of
# an older release without arg_inputs / dynamic_shapes, to check the keyword detection.
def _trt214_compile(exported_program, inputs=None, *, arg_inputs=None, kwarg_inputs=None, device=None,
                    hardware_compatible=False, **kwargs):
    pass


def _trt214_save(module, file_path="", *, extra_files=None, output_format="exported_program", inputs=None,
                 arg_inputs=None, kwarg_inputs=None, retrace=True, use_legacy_exporter=None, pickle_protocol=2,
                 dynamic_shapes=None, **kwargs):
    pass


def _trt_old_compile(exported_program, inputs, *, device=None, enabled_precisions=None):
    pass


def _trt_old_save(module, file_path="", *, output_format="exported_program", inputs=None, retrace=False):
    pass


def test_tensorrt_keywords_follow_the_installed_signature():
    from archiver_scripts.compile import trt_compile_kwargs, trt_save_kwargs

    spec = ["input-spec"]
    new = trt_compile_kwargs(_trt214_compile, spec, torch.float16, hardware_compatible=True)
    assert new == {"arg_inputs": spec, "hardware_compatible": True}  # precision follows the model dtype
    old = trt_compile_kwargs(_trt_old_compile, spec, torch.float16, hardware_compatible=False)
    assert old == {"inputs": spec, "enabled_precisions": {torch.float16}}
    with pytest.raises(CompileError, match="no hardware_compatible option"):
        trt_compile_kwargs(_trt_old_compile, spec, torch.float16, hardware_compatible=True)

    one_row = torch.randn(1, 3, 8, 8)
    saved = trt_save_kwargs(_trt214_save, one_row, (1, 4, 16))
    assert saved["output_format"] == "exported_program" and saved["arg_inputs"][0].shape[0] == 2
    (dims,) = saved["dynamic_shapes"]
    assert dims[0].min == 1 and dims[0].max == 16  # the saved program keeps the whole batch range
    assert "dynamic_shapes" not in trt_save_kwargs(_trt214_save, one_row, (4, 4, 4))  # static spec
    legacy = trt_save_kwargs(_trt_old_save, torch.randn(4, 3, 8, 8), (1, 4, 16))
    assert set(legacy) == {"output_format", "inputs"} and legacy["inputs"][0].shape[0] == 4


def test_archive_warns_about_a_native_cpu_package_without_a_portable_fallback():
    from archiver_scripts.archive import _fallback_for_other_cpus, _portability_note

    native = _info("aoti", device={"type": "cpu", "name": "Some CPU", "arch": "x86_64", "target": "native",
                                   "capability": ["avx2", "avx512f"]})
    note = _portability_note(native, has_fallback=False)
    assert note and "--cpu-target x86-64-v3" in note and "2 instruction-set flags" in note
    assert _portability_note(native, has_fallback=True) is None
    level = _info("aoti", device={"type": "cpu", "arch": "x86_64", "target": "x86-64-v3", "capability": ["avx2"]})
    assert _portability_note(level, has_fallback=False) is None
    assert _fallback_for_other_cpus(level) and _fallback_for_other_cpus(_info("export"))
    assert not _fallback_for_other_cpus(native) and not _fallback_for_other_cpus(_info("aoti", "cuda", [9, 0]))
    arm = _info("aoti", device={"type": "cpu", "arch": "aarch64", "target": "native", "capability": ["asimd"]})
    assert "--cpu-target" not in _portability_note(arm, has_fallback=False)  # x86-64 only
    assert _portability_note(None, has_fallback=False) is None


def _torch_tensorrt():
    try:
        import torch_tensorrt
    except Exception:  # not installed, or its TensorRT libraries cannot load here
        return None
    return torch_tensorrt


@pytest.mark.skipif(_torch_tensorrt() is None, reason="torch-tensorrt not importable here (see docs/gpu-verification.md)")
def test_tensorrt_keywords_exist_in_the_installed_library():
    import inspect

    from archiver_scripts.compile import trt_compile_kwargs, trt_save_kwargs

    trt = _torch_tensorrt()
    compile_params = inspect.signature(trt.dynamo.compile).parameters
    save_params = inspect.signature(trt.save).parameters
    assert set(trt_compile_kwargs(trt.dynamo.compile, ["spec"], torch.float16, False)) <= set(compile_params)
    saved = trt_save_kwargs(trt.save, torch.randn(1, 3, 8, 8), (1, 4, 16))
    assert set(saved) <= set(save_params)
