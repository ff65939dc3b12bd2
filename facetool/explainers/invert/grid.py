"""The comparison image of ``facetool invert``: input faces above their inversions."""

from __future__ import annotations

import math

import numpy as np


def grid_image(inputs: np.ndarray | None, inverted: np.ndarray, columns: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 RGB grid: for every ``columns`` faces, a row of inputs (if any) above a row of inversions."""
    n, h, w, _ = inverted.shape
    cols = min(columns, n)
    chunks = math.ceil(n / cols)
    rows_per = 2 if inputs is not None else 1
    H = chunks * rows_per * (h + pad) + pad
    W = cols * (w + pad) + pad
    out = np.full((H, W, 3), 255, np.uint8)
    for i in range(n):
        c, r = i % cols, (i // cols) * rows_per
        x0 = pad + c * (w + pad)
        for k, img in enumerate([inputs[i]] if inputs is not None else []):
            y0 = pad + (r + k) * (h + pad)
            out[y0 : y0 + h, x0 : x0 + w] = img
        y0 = pad + (r + rows_per - 1) * (h + pad)
        out[y0 : y0 + h, x0 : x0 + w] = inverted[i]
    return out
