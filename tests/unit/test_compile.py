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

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from archiver_scripts.compile import CompileError, CompileOptions, cache_key, compile_model
from handlers.artifacts import (
    ArtifactInfo,
    choose,
    cpu_flags,
    cpu_requirements,
    device_info,
    library_versions,
    native_cpu_precision,
    refusal,
)
from handlers.errors import ModelLoadError
from handlers.image_classifier import ImageClassifier
from handlers.testing import FakeContext, raw_request, run_handler
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
    # More rows than compiled for: the artifact refuses them (torch.export's shape guard raises
    # AssertionError "Guard failed: ..." in torch 2.14; RuntimeError in other versions' runtimes).
    with pytest.raises((AssertionError, RuntimeError)):
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


# --- compiling for cuda:N on a machine with several GPUs ------------------------------------------


class FakeGPUs:
    """Two GPUs as far as `tsgpu compile` can tell: the current-device state, capability and name
    answer per device (cuda:0 is an A100, cuda:1 an H100), so work done on the wrong one shows in
    what gets recorded. Tensors stay on the CPU: `.to(cuda:N)` records N and keeps them there."""

    CAPABILITY = {0: (8, 0), 1: (9, 0)}

    def __init__(self, monkeypatch) -> None:
        self.current = 0
        self.entered: list[int] = []  # indices made current with `torch.cuda.device`
        self.moved_to: set[int] = set()  # indices tensors and modules were moved to
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            args = tuple(self._cpu(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = self._cpu(kwargs["device"])
            return real_to(tensor, *args, **kwargs)

        fake = self

        class device:  # torch.cuda.device: makes one device current inside a `with`
            def __init__(self, which) -> None:
                self.index, self.previous = fake.index(which), None

            def __enter__(self):
                self.previous, fake.current = fake.current, self.index
                fake.entered.append(self.index)

            def __exit__(self, *exc) -> None:
                fake.current = self.previous

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.CAPABILITY))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: setattr(self, "current", self.index(d)))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: self.CAPABILITY[self.index(d)])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"fake GPU {self.index(d)}")

    def index(self, which) -> int:
        """The device index `which` names; None or a bare `cuda` mean the current device."""
        if which is None or isinstance(which, int):
            return self.current if which in (None, -1) else which
        which = torch.device(which)
        return self.current if which.index is None else which.index

    def _cpu(self, arg):
        if isinstance(arg, (str, torch.device)):
            try:
                device = torch.device(arg)
            except RuntimeError:
                return arg
            if device.type == "cuda":
                self.moved_to.add(self.index(device))
                return torch.device("cpu")
        return arg


def _fake_aoti(monkeypatch, gpus: FakeGPUs) -> list[dict]:
    """AOTInductor's package and load calls, as an ExportedProgram on disk (torch 2.14 signatures)."""
    calls: list[dict] = []

    def compile_and_package(program, _a=None, _b=None, *, package_path=None, inductor_configs=None):
        calls.append({"call": "package", "current": gpus.current})
        torch.export.save(program, package_path)
        return package_path

    def load_package(path, run_single_threaded=False, device_index=-1):
        calls.append({"call": "load", "device_index": device_index, "current": gpus.current})
        return torch.export.load(str(path)).module()

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load_package)
    return calls


def _fake_torch_tensorrt(monkeypatch, gpus: FakeGPUs) -> list[dict]:
    """A torch_tensorrt module with 2.14.0's `dynamo.compile` / `save` signatures; the "engine" is the
    ExportedProgram itself, so the saved artifact loads and validates for real on the CPU."""
    import types

    calls: list[dict] = []

    def compile(exported_program, inputs=None, *, arg_inputs=None, kwarg_inputs=None, device=None,
                hardware_compatible=False, **kwargs):
        calls.append({"call": "compile", "device": device, "current": gpus.current})
        return exported_program

    def save(module, file_path="", *, output_format="exported_program", inputs=None, arg_inputs=None,
             dynamic_shapes=None, **kwargs):
        calls.append({"call": "save", "current": gpus.current})
        torch.export.save(module, file_path)

    fake = types.ModuleType("torch_tensorrt")
    fake.Input = lambda **spec: spec
    fake.dynamo = types.SimpleNamespace(compile=compile)
    fake.save = save
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    return calls


def test_aoti_for_cuda_1_builds_loads_and_records_cuda_1(tmp_path, weights, monkeypatch):
    """`--device cuda:1` with cuda:0 current: the build runs with cuda:1 current, the package loads
    with device_index=1 (built and on a cache hit), and the recorded capability is cuda:1's."""
    gpus = FakeGPUs(monkeypatch)
    calls = _fake_aoti(monkeypatch, gpus)
    result = compile_model(opts(tmp_path, weights, backend="aoti", device="cuda:1"), log=quiet)
    again = compile_model(opts(tmp_path, weights, backend="aoti", device="cuda:1", output=tmp_path / "again"),
                          log=quiet)
    assert again.meta["cache"]["hit"] is True
    assert [c["call"] for c in calls] == ["package", "load", "load"]
    assert all(c["current"] == 1 for c in calls), calls
    assert [c["device_index"] for c in calls if c["call"] == "load"] == [1, 1]
    assert result.meta["device"] == {"type": "cuda", "name": "fake GPU 1", "capability": [9, 0]}
    assert gpus.entered == [1, 1] and gpus.current == 0  # restored after each compile
    assert gpus.moved_to == {1}


def test_tensorrt_for_cuda_1_builds_on_cuda_1(tmp_path, weights, monkeypatch):
    gpus = FakeGPUs(monkeypatch)
    calls = _fake_torch_tensorrt(monkeypatch, gpus)
    result = compile_model(opts(tmp_path, weights, backend="tensorrt", device="cuda:1"), log=quiet)
    assert result.meta["backend"] == "tensorrt" and result.meta["validation"]["passed"]
    (built,) = [c for c in calls if c["call"] == "compile"]
    assert built["device"] == torch.device("cuda", 1) and built["current"] == 1
    assert all(c["current"] == 1 for c in calls)
    assert result.meta["device"]["capability"] == [9, 0] and gpus.moved_to == {1}


def test_bare_cuda_means_the_current_device_and_bad_indices_are_refused(tmp_path, weights, monkeypatch):
    from archiver_scripts.compile import resolve_device

    gpus = FakeGPUs(monkeypatch)
    gpus.current = 1
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CompileError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(CompileError, match="--device 'gpu': expected cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_trt_compile_kwargs_pass_the_device_where_accepted():
    from archiver_scripts.compile import trt_compile_kwargs

    cuda1 = torch.device("cuda", 1)
    assert trt_compile_kwargs(_trt214_compile, ["s"], torch.float32, False, cuda1)["device"] == cuda1
    assert trt_compile_kwargs(_trt_old_compile, ["s"], torch.float32, False, cuda1)["device"] == cuda1

    def no_device(exported_program, inputs=None, *, arg_inputs=None):
        pass

    assert "device" not in trt_compile_kwargs(no_device, ["s"], torch.float32, False, cuda1)


# --- non-square inputs: --input-size H,W ----------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("224", (224, 224)), ("480,640", (480, 640)), (" 96, 128", (96, 128))])
def test_parse_input_size(text, expected):
    from archiver_scripts.compile import parse_input_size

    assert parse_input_size(text) == expected


@pytest.mark.parametrize("text", ["0", "a,b", "1,2,3", "", "-4", "480,0", "480x640"])
def test_bad_input_size_names_the_flag(text, tmp_path, capsys):
    from archiver_scripts.cli import main
    from archiver_scripts.compile import parse_input_size

    with pytest.raises(CompileError, match=re.escape(f"--input-size {text!r}: expected one positive side")):
        parse_input_size(text)
    code = main(["compile", "--model", MODEL, "--input-size", text, "--output", str(tmp_path / "out")])
    assert code == 1 and f"--input-size {text!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_compile_options_normalise_input_size(tmp_path):
    assert CompileOptions(model=MODEL, output=tmp_path).input_size == (224, 224)
    assert CompileOptions(model=MODEL, output=tmp_path, input_size=160).input_size == (160, 160)  # older callers
    assert CompileOptions(model=MODEL, output=tmp_path, input_size=[96, 128]).input_size == (96, 128)
    for bad in (0, (96,), (96, 0), (96.0, 128), True):
        with pytest.raises(CompileError, match="--input-size"):
            CompileOptions(model=MODEL, output=tmp_path, input_size=bad)


def test_non_square_export_from_the_cli_records_and_runs_h_w(tmp_path, weights):
    """`tsgpu compile --input-size 96,128`: the artifact is validated at 96x128, records shape
    [3, 96, 128], runs on a [1, 3, 96, 128] input, and warms up through the backbone at (96, 128)."""
    from archiver_scripts.cli import main
    from handlers.backbone import load_backbone, warm_up
    from handlers.config import ModelConfig

    out = tmp_path / "out"
    code = main(["compile", "--model", MODEL, "--weights", str(weights), "--backend", "export", "--batch", "1,2,4",
                 "--input-size", "96,128", "--name", "wide", "--output", str(out), "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    artifact = out / "wide.export-cpu.pt2"
    meta = json.loads((out / "wide.export-cpu.pt2.json").read_text())
    assert meta["input"]["shape"] == [3, 96, 128] and meta["validation"]["passed"]
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        got = torch.export.load(str(artifact)).module()(x)
        assert (got - models.make_model()(x)).abs().max().item() < 1e-3
    backbone = load_backbone(out, artifact.name, ModelConfig(), torch.device("cpu"))
    assert warm_up(backbone, [1, 4], (96, 128), runs=1) >= 0.0
    # A handler whose preprocess makes another size refuses the artifact at load, naming the fix;
    # with input_size set to the artifact's it serves.
    (out / "index_to_name.json").write_text(json.dumps(models.LABELS))
    with pytest.raises(ModelLoadError, match=r"compiled for 96x128 .* makes 224x224: set handler.preprocess.input_size: \[96, 128\]"):
        ImageClassifier().initialize(FakeContext(out, serialized_file=artifact.name, handler_config={}))
    context = FakeContext(out, serialized_file=artifact.name,
                          handler_config={"preprocess": {"input_size": [96, 128], "resize_size": 128}})
    handler = ImageClassifier()
    handler.initialize(context)
    photo = samples.encode(samples.photos()["chelsea"], "JPEG")
    assert [r.status for r in run_handler(handler, context, [raw_request(photo)])] == [200]


def test_cache_key_separates_input_sizes(tmp_path, weights):
    device = device_info(torch.device("cpu"))
    versions = library_versions()
    keys = {cache_key("w", opts(tmp_path, weights, input_size=size), "aoti", device, versions)
            for size in (224, (96, 128), (128, 96))}
    assert len(keys) == 3
    assert cache_key("w", opts(tmp_path, weights, input_size=224), "aoti", device, versions) == \
        cache_key("w", opts(tmp_path, weights, input_size=(224, 224)), "aoti", device, versions)


def test_warm_up_feeds_height_by_width():
    from handlers.backbone import Backbone, warm_up

    seen = []
    backbone = Backbone(lambda x: seen.append(tuple(x.shape)), "eager", Path("m.pt"), torch.device("cpu"))
    warm_up(backbone, [1, 2], (48, 64), runs=1)
    warm_up(backbone, [1], 32, runs=1)  # one int: a square, as before
    assert seen == [(1, 3, 48, 64), (2, 3, 48, 64), (1, 3, 32, 32)]


def test_torchvision_segmentation_model_builds_offline_and_its_eager_code_runs(tmp_path, monkeypatch):
    """torchvision's detection/segmentation builders fetch backbone weights unless told not to: the
    build must never download (the user's --weights hold the model), and the generated code that
    rebuilds an eager artifact must be valid Python (None, not JSON null)."""
    import importlib.util
    import urllib.request

    from archiver_scripts.compile import _eager_artifact, load_model

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download during a build")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    model, source = load_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    weights, meta = _eager_artifact(model, source, CompileOptions(model="torchvision:lraspp_mobilenet_v3_large",
                                                                  output=tmp_path), tmp_path, "seg")
    spec = importlib.util.spec_from_file_location("seg_build", tmp_path / meta["model_source"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.build()
    rebuilt.load_state_dict(torch.load(weights, weights_only=True))
    assert type(rebuilt).__name__ == "LRASPP"
