"""torchserve-gpu-handlers: TorchServe handlers for vision models.

Importing this package does nothing but define names: no torch import, no CUDA, no thread or
precision settings. Submodules:

- `handlers.image_classifier.ImageClassifier`: top-k classification handler;
- `handlers.base.VisionHandler`: the base class to subclass for your own task;
- `handlers.config`: the `handler:` section of model-config.yaml;
- `handlers.preprocess`: CPU (and later GPU) decode/resize backends;
- `handlers.testing`: FakeContext and request builders for unit tests.
"""

__version__ = "0.1.0"
