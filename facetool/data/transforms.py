"""The one normalisation used for training and evaluation: RGB, (x/255 - 0.5) / 0.5."""

from __future__ import annotations

import numpy as np
import torch

MEAN = 127.5
STD = 127.5


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W,3) or (H,W,3) RGB -> float32 (N,3,H,W) / (3,H,W) in [-1, 1]."""
    t = torch.as_tensor(images)
    if t.dim() == 3:
        t = t.permute(2, 0, 1)
    else:
        t = t.permute(0, 3, 1, 2)
    return (t.float() - MEAN) / STD


def denormalize(x: torch.Tensor) -> np.ndarray:
    """float (N,3,H,W) in [-1, 1] -> uint8 (N,H,W,3) RGB."""
    x = (x.detach().float().cpu() * STD + MEAN).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """(N,3,H,W) resized to ``size`` x ``size`` (bilinear, antialiased) when it is another size."""
    if size is None or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def item_image(image: np.ndarray, flip: bool = False, size: int | None = None) -> torch.Tensor:
    """One uint8 (H,W,3) RGB crop as a dataset serves it: a random horizontal flip when ``flip`` (training
    augmentation; one ``torch.rand`` draw), :func:`normalize`, resized to ``size`` -> float32 (3,H,W).
    The face store's and the RecordIO pack's datasets both serve their items through it."""
    img = torch.from_numpy(image).permute(2, 0, 1).float()
    if flip and torch.rand(()) < 0.5:
        img = img.flip(-1)
    return _resize(((img - MEAN) / STD)[None], size)[0]


def model_input(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 (N,H,W,3) RGB crops -> the model's input: :func:`normalize`, then resized to ``size`` (bilinear,
    antialiased) exactly as :class:`facetool.data.dataset.FaceDataset` serves them (for images rendered or
    edited in memory that never pass through a store)."""
    return _resize(normalize(images), size)
