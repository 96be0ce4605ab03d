"""The reference every preprocess backend is held to: torchvision's ImageNet eval transform on PIL."""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reference_tensor(data: bytes, resize: int = 256, crop: int = 224) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    transform = T.Compose([
        T.Resize(resize, antialias=True),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    return transform(image)


def reference_batch(items: list[bytes], resize: int = 256, crop: int = 224) -> torch.Tensor:
    return torch.stack([reference_tensor(d, resize, crop) for d in items])
