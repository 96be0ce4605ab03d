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


def reference_mode_tensor(
    data: bytes, mode: str, input_hw: tuple[int, int], resize: int = 256, pad_value: int = 114,
) -> torch.Tensor:
    """The reference for every geometry mode, written independently of handlers/preprocess.

    center_crop: torchvision Resize(resize) + CenterCrop((h, w)). stretch: Pillow's bilinear
    (antialiased) resize of the whole image to (w, h). letterbox: the same resize to the size
    Ultralytics' LetterBox computes, pasted on a pad_value canvas at its offsets.
    """
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    height, width = input_hw
    if mode == "center_crop":
        image = T.CenterCrop((height, width))(T.Resize(resize, antialias=True)(image))
    elif mode == "stretch":
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    elif mode == "letterbox":
        w0, h0 = image.size
        r = min(height / h0, width / w0)
        new_w, new_h = int(round(w0 * r)), int(round(h0 * r))
        dw, dh = (width - new_w) / 2, (height - new_h) / 2
        canvas = Image.new("RGB", (width, height), (pad_value,) * 3)
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BILINEAR),
                     (int(round(dw - 0.1)), int(round(dh - 0.1))))
        image = canvas
    else:
        raise ValueError(mode)
    return T.Normalize(MEAN, STD)(T.ToTensor()(image))
