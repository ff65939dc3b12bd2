"""Face detection (RetinaFace on ONNX Runtime) and the one alignment path (5-point / box crops)."""

from facetool.detect.align import ARCFACE_DST, align_5pt, bbox_crop, similarity_transform, template, transform_points
from facetool.detect.retinaface import Detections, RetinaFace, read_rgb

__all__ = [
    "ARCFACE_DST", "align_5pt", "bbox_crop", "similarity_transform", "template", "transform_points",
    "Detections", "RetinaFace", "read_rgb",
]
