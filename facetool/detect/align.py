"""The one face preprocessing path: 5-point similarity alignment and box crops.

Every dataset source (and the IJB evaluator) goes through :func:`align_5pt` or :func:`bbox_crop`, so a
face is cropped the same way for training and for evaluation.
"""

from __future__ import annotations

import cv2
import numpy as np

#: The arcface 5-point template for a 112x112 crop: left eye, right eye, nose, left/right mouth corner.
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def template(size: int = 112) -> np.ndarray:
    """The 5-point template for a ``size`` x ``size`` crop.

    Multiples of 112 scale the 112 template; other sizes scale it as a 128 crop (ratio size/128) and
    shift it right by 8·ratio, the insightface convention for 128-pixel crops.
    """
    if size % 112 == 0:
        return ARCFACE_DST * (size / 112.0)
    ratio = size / 128.0
    dst = ARCFACE_DST * ratio
    dst[:, 0] += 8.0 * ratio
    return dst


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    scikit-image's ``SimilarityTransform`` estimate (Umeyama 1991, never a reflection); returns the 2x3
    matrix M with ``dst ≈ M[:, :2] @ src + M[:, 2]``. Where it defines no rotation (the cross-covariance of
    the centred points is 0, e.g. all ``src`` or all ``dst`` points coincide) M maps the ``src`` mean
    onto the ``dst`` mean with scale 1 if the ``src`` points coincide, else 0.
    """
    from skimage.transform import SimilarityTransform

    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (n,2) point sets with n >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("similarity_transform needs finite points")
    tform = SimilarityTransform.from_estimate(src, dst)
    if tform:
        return tform.params[:2].astype(np.float32)
    mu_s, mu_d = src.mean(0), dst.mean(0)  # the covariance is 0: scale 0, unless src has no spread
    scale = 0.0 if ((src - mu_s) ** 2).sum() > 0 else 1.0
    return np.hstack([scale * np.eye(2), (mu_d - scale * mu_s)[:, None]]).astype(np.float32)


def transform_points(pts: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points (..., 2)."""
    pts = np.asarray(pts, np.float32)
    M = np.asarray(M, np.float32)
    return pts @ M[:, :2].T + M[:, 2]


def align_5pt(image: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` so its 5 landmarks land on the template. Returns (size x size crop, 2x3 M)."""
    lm = np.asarray(landmarks5, np.float32).reshape(5, 2)
    M = similarity_transform(lm, template(size))
    crop = cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, M


def bbox_matrix(box: np.ndarray, size: int | tuple[int, int] = 128) -> np.ndarray:
    """The 2x3 matrix of :func:`bbox_crop`: box ``x1 y1 x2 y2`` (pixel edges) onto a size x size crop."""
    w_out, h_out = (size, size) if isinstance(size, int) else (size[1], size[0])
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = (x2 - x1) / w_out, (y2 - y1) / h_out  # source pixels per output pixel
    if sx <= 0 or sy <= 0:
        raise ValueError(f"empty box {box}")
    # pixel centres: output u covers source x1 + (u + 0.5)·sx - 0.5  (same as cv2.resize of the crop)
    return np.array([[1 / sx, 0, (0.5 - x1) / sx - 0.5], [0, 1 / sy, (0.5 - y1) / sy - 0.5]], np.float32)


def bbox_crop(image: np.ndarray, box: np.ndarray, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Crop the box and resize it to size x size (the ConvNet-IIG IMDb-Face crop); outside is 0.

    For an integer box inside the image this equals ``cv2.resize(image[y1:y2, x1:x2], (size, size))``
    except on the 1-pixel border, where it interpolates with the pixels just outside the box.
    """
    M = bbox_matrix(box, size)
    crop = cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, M
