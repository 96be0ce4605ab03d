"""Small deterministic models for tests: fast on CPU, with logits that really depend on the image.

`TinyClassifier` is also written out as `model.py` for eager-mode archives (see `write_model_py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 10
LABELS = {str(i): f"class_{i}" for i in range(NUM_CLASSES)}

from tests.tiny_model import TinyClassifier

MODEL_SOURCE_FILE = Path(__file__).with_name("tiny_model.py")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyClassifier(NUM_CLASSES)
    with torch.no_grad():
        model.fc.weight.mul_(40.0)  # spread the logits: top-k order is then stable and meaningful
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def write_model_py(directory: Path) -> Path:
    path = directory / "model.py"
    path.write_text(MODEL_SOURCE_FILE.read_text())
    return path


def write_labels(directory: Path) -> Path:
    path = directory / "index_to_name.json"
    path.write_text(json.dumps(LABELS))
    return path


def save_torchscript(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def save_exported_program(model: nn.Module, path: Path, max_batch: int = 64) -> Path:
    x = torch.randn(2, 3, 224, 224)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path


def save_state_dict(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), str(path))
    return path


def build_tiny_archive(name: str, store: Path, build_dir: Path, **archive_kwargs) -> Path:
    """The TinyClassifier (TorchScript, with its labels) archived as `store/name.mar` by
    `tsgpu archive`'s build_archive; extra keyword arguments go to it (batch_size, config...)."""
    from archiver_scripts.archive import build_archive

    script = build_dir / "tiny.pt"
    if not script.exists():
        save_torchscript(make_model(), script)
    return build_archive(name, script, store, labels=write_labels(build_dir), log=lambda message: None,
                         **archive_kwargs)


#: The worked example of a new task written as one module (docs/subclassing.md).
TAGGER = Path(__file__).resolve().parents[1] / "docs" / "examples" / "multilabel_tagger.py"
CONST_TAGS = """import torch
from torch import nn


class ConstTags(nn.Module):
    \"\"\"Logits [2.0, -2.0, 0.5] for every image: sigmoid 0.880797, 0.119203, 0.622459.\"\"\"

    def forward(self, x):
        return torch.tensor([[2.0, -2.0, 0.5]], device=x.device).expand(x.shape[0], -1) + 0 * x.mean()
"""


def tagger_model(directory: Path) -> tuple[Path, Path]:
    """(state dict, model.py) of the constant-logit tagging model."""
    (directory / "tags_model.py").write_text(CONST_TAGS)
    torch.save({}, directory / "tags.pt")
    return directory / "tags.pt", directory / "tags_model.py"
