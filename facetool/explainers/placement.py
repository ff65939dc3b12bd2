"""Placing a feature map on the image it was computed from: every cell on the centre of its receptive field.

With "same"-padded convolutions, cell j of a stride-s map is centred on input pixel s*j. Resampling with
``interpolate(align_corners=False)`` (or cv2.resize, which pytorch-grad-cam uses) assumes s*(j + 0.5) - 0.5
instead and shifts the map by (s - 1)/2 px down and to the right: 7.5 px for a ResNet's stride-16 maps,
15.5 px at stride 32. Every explainer that shows a map on a face goes through :func:`upsample_maps`:
ABN attention (``dissect attention``, ``dissect relevance --method attention``), the Grad-CAM family
(``dissect relevance --method gradcam|gradcam++|scorecam``) and unit maps (``dissect units``).
"""

from __future__ import annotations

import numpy as np
import torch


def cell_weights(n_out: int, n_in: int, stride: float, scale: float) -> torch.Tensor:
    """(n_out, n_in) linear-interpolation weights: output pixel i (centre i + 0.5 on the image) sits at
    input coordinate (i + 0.5) * scale - 0.5 and at map coordinate that / stride (clamped to the map)."""
    u = np.clip(((np.arange(n_out) + 0.5) * scale - 0.5) / stride, 0, n_in - 1)
    j0 = np.floor(u).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    w = (u - j0).astype(np.float32)
    out = np.zeros((n_out, n_in), np.float32)
    np.add.at(out, (np.arange(n_out), j0), 1 - w)
    np.add.at(out, (np.arange(n_out), j1), w)
    return torch.from_numpy(out)


def upsample_weights(map_size: tuple[int, int], size: tuple[int, int], input_size: tuple[int, int] | None = None,
                     stride: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (H, h) row and (W, w) column weights :func:`upsample_maps` resamples an (h, w) map with."""
    H, W = size
    Sh, Sw = input_size or size
    h, w = map_size
    sy = float(stride) if stride else Sh / h
    sx = float(stride) if stride else Sw / w
    return cell_weights(H, h, sy, Sh / H), cell_weights(W, w, sx, Sw / W)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int], input_size: tuple[int, int] | None = None,
                  stride: float | None = None) -> torch.Tensor:
    """Maps (B, A, h, w) of a model that saw ``input_size`` (S_h, S_w) pixels (default ``size``), where
    cell (j, k) is centred on input pixel (stride*j, stride*k) ("same"-padded convolutions; default
    stride S/h), bilinearly resampled onto an image of ``size`` (H, W) that was resized to the input
    size (pixel-centre convention); beyond the first/last cell centre the border value is kept."""
    wy, wx = upsample_weights(tuple(maps.shape[-2:]), size, input_size, stride)
    wy, wx = wy.to(maps), wx.to(maps)
    return torch.einsum("ij,bajk,lk->bail", wy, maps, wx)
