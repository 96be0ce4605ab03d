"""Shared fixtures: real photos (scikit-image's bundled samples) and small models on disk."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

from tests import models

# torch.jit is deprecated in torch 2.14 but TorchScript files are still what many users archive.
warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)


@pytest.fixture(scope="session")
def photos():
    from archiver_scripts import samples

    return samples.photos()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A directory with the same TinyClassifier saved in every supported format, plus labels."""
    directory = tmp_path_factory.mktemp("models")
    model = models.make_model()
    models.save_torchscript(model, directory / "model.pt")
    models.save_exported_program(model, directory / "model_ep.pt2")
    models.save_state_dict(model, directory / "weights.pt")
    models.write_model_py(directory)
    models.write_labels(directory)
    return directory


@pytest.fixture(scope="session")
def reference_model():
    return models.make_model()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; on a CPU-only host they are skipped, never faked."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU-only path; see docs/gpu-verification.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Libraries a test module may import at its top (directly or through handlers/) that a host can lack:
# a GPU host carries TorchServe's Python package, torch-model-archiver and pycocotools in a small
# bundle (benchmarks/gpu_check.py), and a partial install must not stop the whole run at collection.
# Only a top-level package that is really absent turns the module's error into a skip with the reason;
# anything else (a broken install, a missing submodule of an installed package) still fails.
OPTIONAL_MODULES = {
    "ts": "TorchServe's Python package is not installed (pip install torchserve==0.12.0)",
    "model_archiver": "torch-model-archiver is not installed (pip install torch-model-archiver==0.12.0)",
    "pycocotools": "pycocotools is not installed (pip install pycocotools)",
}
_NO_MODULE = re.compile(r"No module named '([A-Za-z0-9_.]+)'")


def _absent(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):
        return True


def missing_optional_module(error_text: str) -> str | None:
    """The skip reason when a collection error is an optional library that is not installed."""
    for name in _NO_MODULE.findall(error_text):
        top = name.split(".")[0]
        if top in OPTIONAL_MODULES and _absent(top):
            return OPTIONAL_MODULES[top]
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not isinstance(collector, pytest.Module):
        return
    reason = missing_optional_module(str(report.longrepr))
    if reason:
        outcome.force_result(pytest.CollectReport(
            report.nodeid, "skipped", (str(collector.path), None, f"Skipped: {reason}"), [],
            sections=report.sections,
        ))
