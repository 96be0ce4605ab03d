"""Shared fixtures: real photos (scikit-image's bundled samples) and small models on disk."""

from __future__ import annotations

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
