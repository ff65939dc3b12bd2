"""Alignment geometry and RetinaFace detection on real faces (insightface's t1.jpg)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetool.detect import ARCFACE_DST, RetinaFace, align_5pt, bbox_crop, read_rgb, similarity_transform, transform_points
from facetool.detect.align import template
from facetool.detect.retinaface import anchor_centres, decode_biubug6, nms, prior_boxes
from facetool.errors import FacetoolError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def t1_path() -> Path:
    spec = importlib.util.find_spec("insightface")
    return Path(spec.origin).parent / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return read_rgb(t1_path())


@pytest.fixture(scope="module")
def detector() -> RetinaFace:
    return RetinaFace()


def test_similarity_transform_recovers_known_similarity():
    ang, s, t = np.deg2rad(30), 2.0, np.array([5.0, -3.0])
    R = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    src = np.array([[0, 0], [1, 0], [0, 1], [2, 3], [-1, 4]], float)
    dst = src @ R.T + t
    M = similarity_transform(src, dst)
    # hand values: 2·cos30 = 1.7320508, 2·sin30 = 1
    np.testing.assert_allclose(M, [[1.7320508, -1.0, 5.0], [1.0, 1.7320508, -3.0]], atol=1e-5)
    np.testing.assert_allclose(transform_points(src, M), dst, atol=1e-4)


def test_similarity_transform_never_reflects():
    src = ARCFACE_DST.astype(float)
    mirrored = src * [-1, 1]
    M = similarity_transform(src, mirrored)
    assert np.linalg.det(M[:, :2]) > 0  # a rotation, not a reflection


def test_similarity_transform_pinned_values():
    """A face's 5 points onto the 112 and 128 templates: the matrices 0.2.1 computed (its own Umeyama
    code), to 1e-6; the crop is the warp by that matrix."""
    lm = np.array([[101.3, 122.7], [151.9, 118.2], [128.4, 149.6], [108.8, 175.1], [149.5, 171.3]])
    M = similarity_transform(lm, template(112))
    np.testing.assert_allclose(M, [[0.7381054759, -0.0443456434, -31.9009208679],
                                   [0.0443456434, 0.7381054759, -42.5565605164]], atol=1e-6)
    np.testing.assert_allclose(similarity_transform(lm, template(128)),
                               [[0.7381054759, -0.0443456434, -23.9009208679],
                                [0.0443456434, 0.7381054759, -42.5565605164]], atol=1e-6)
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (260, 250, 3), dtype=np.uint8), (0, 0), 2)
    crop, M2 = align_5pt(img, lm)  # takes the points as float32
    np.testing.assert_array_equal(M2, similarity_transform(lm.astype(np.float32), template(112)))
    np.testing.assert_allclose(M2, M, atol=2e-5)
    np.testing.assert_array_equal(crop, cv2.warpAffine(img, M2, (112, 112), flags=cv2.INTER_LINEAR))


def test_similarity_transform_is_scikit_image_estimate(monkeypatch):
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    for k in range(50):  # random, mirrored and collinear point sets
        src = rng.normal(size=(5, 2)) * 50 + 100
        dst = src * [-1, 1] if k % 3 == 0 else rng.normal(size=(5, 2)) * 30 + 56
        if k % 5 == 0:
            src[:, 1] = 2 * src[:, 0] + 1
        want = SimilarityTransform.from_estimate(src, dst).params[:2]
        np.testing.assert_allclose(similarity_transform(src, dst), want, rtol=0, atol=1e-4)
    calls = []
    real = SimilarityTransform.from_estimate.__func__
    monkeypatch.setattr(SimilarityTransform, "from_estimate",
                        classmethod(lambda cls, *a, **kw: calls.append(1) or real(cls, *a, **kw)))
    similarity_transform(ARCFACE_DST, ARCFACE_DST * 2)
    assert calls == [1]  # the estimate is scikit-image's


def test_similarity_transform_degenerate_points():
    same = np.full((5, 2), 7.0)
    # no spread in src: the translation of the means (scale 1); no spread in dst: everything onto its mean
    np.testing.assert_allclose(similarity_transform(same, ARCFACE_DST), [[1, 0, 56.02616 - 7], [0, 1, 71.90078 - 7]],
                               atol=1e-4)
    np.testing.assert_allclose(similarity_transform(ARCFACE_DST, same), [[0, 0, 7], [0, 0, 7]], atol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((5, 2), np.nan), ARCFACE_DST)
    with pytest.raises(ValueError, match=r"\(n,2\)"):
        similarity_transform(ARCFACE_DST[:1], ARCFACE_DST[:1])


def test_template_sizes():
    np.testing.assert_allclose(template(112), ARCFACE_DST)
    np.testing.assert_allclose(template(224), ARCFACE_DST * 2)
    np.testing.assert_allclose(template(128)[0], ARCFACE_DST[0] + [8, 0], atol=1e-5)


def test_align_5pt_maps_landmarks_onto_template():
    canvas = np.zeros((112, 112, 3), np.uint8)
    for (x, y), c in zip(ARCFACE_DST, COLOURS):
        cv2.circle(canvas, (int(round(x * 16)), int(round(y * 16))), 3 * 16, c, -1, lineType=cv2.LINE_AA, shift=4)
    ang, s = np.deg2rad(25), 2.3
    A = np.array([[s * np.cos(ang), -s * np.sin(ang), 140.0], [s * np.sin(ang), s * np.cos(ang), 60.0]], np.float32)
    big = cv2.warpAffine(canvas, A, (480, 420), flags=cv2.INTER_CUBIC)
    pts = transform_points(ARCFACE_DST, A)  # where the five points are in the big image
    crop, M = align_5pt(big, pts)
    assert crop.shape == (112, 112, 3)
    np.testing.assert_allclose(transform_points(pts, M), ARCFACE_DST, atol=1e-3)
    for (x, y), c in zip(ARCFACE_DST, COLOURS):
        mask = np.all(np.abs(crop.astype(int) - c) < 60, axis=2)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 10
        assert abs(xs.mean() - x) < 1.0 and abs(ys.mean() - y) < 1.0


def test_bbox_crop_is_crop_and_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    crop, M = bbox_crop(img, (40, 30, 200, 190), size=128)
    ref = cv2.resize(img[30:190, 40:200], (128, 128), interpolation=cv2.INTER_LINEAR)
    assert np.abs(crop.astype(int) - ref)[1:-1, 1:-1].max() <= 2  # edges: resize replicates, we sample outside
    # pixel-centre coordinates: the box edges (x - 0.5) land on the crop edges (u - 0.5)
    np.testing.assert_allclose(transform_points([[39.5, 29.5], [199.5, 189.5]], M), [[-0.5, -0.5], [127.5, 127.5]], atol=1e-4)
    # a box sticking out of the image is padded with 0
    crop2, _ = bbox_crop(img, (-100, -100, 100, 100), size=64)
    assert crop2[:20, :20].max() == 0 and crop2[40:, 40:].min() > 0


def test_prior_boxes_and_decoding_hand_values():
    p = prior_boxes(64, 32)
    # stride 8: 8x4 cells x 2 sizes, stride 16: 4x2x2, stride 32: 2x1x2
    assert len(p) == 64 + 16 + 4
    np.testing.assert_allclose(p[:3], [[4, 4, 16, 16], [4, 4, 32, 32], [12, 4, 16, 16]])
    np.testing.assert_allclose(p[64], [8, 8, 64, 64])
    loc = np.array([[1.0, -1.0, 0.0, np.log(2) / 0.2]])
    landm = np.zeros((1, 10))
    landm[0, :2] = [1.0, 2.0]
    boxes, lm = decode_biubug6(loc, landm, np.array([[100.0, 50.0, 20.0, 20.0]]))
    # centre (100 + 0.1·20, 50 - 0.1·20) = (102, 48); w = 20, h = 40
    np.testing.assert_allclose(boxes, [[92, 28, 112, 68]], atol=1e-5)
    np.testing.assert_allclose(lm[0, 0], [102, 54], atol=1e-5)
    np.testing.assert_allclose(anchor_centres(16, 16, 8, 2)[:4], [[0, 0], [0, 0], [8, 0], [8, 0]])


@pytest.mark.parametrize("mean", [(104, 117, 123), (104, 117, 127)])
def test_retinaface_finds_six_faces_in_t1(t1, mean):
    det = RetinaFace(mean=mean)
    r = det.detect(t1)
    assert len(r) == 6
    assert r.scores.min() > 0.99
    assert r.boxes.shape == (6, 4) and r.landmarks.shape == (6, 5, 2)
    w = r.boxes[:, 2] - r.boxes[:, 0]
    assert (w > 80).all() and (w < 130).all()
    # landmarks lie inside their boxes; left eye left of right eye, eyes above the mouth
    lm = r.landmarks
    assert (lm[..., 0] > r.boxes[:, None, 0]).all() and (lm[..., 0] < r.boxes[:, None, 2]).all()
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, :2, 1].max(1) < lm[:, 3:, 1].min(1)).all()


def test_detect_batch_matches_single_and_rescales(detector, t1):
    single = detector.detect(t1)
    part = t1[100:500, 400:1050]
    batch = detector.detect_batch([t1, part])
    assert len(batch[0]) == 6
    np.testing.assert_allclose(np.sort(batch[0].boxes, 0), np.sort(single.boxes, 0), atol=1.0)
    inside = single.boxes[(single.boxes[:, 0] > 400) & (single.boxes[:, 1] > 100) & (single.boxes[:, 2] < 1050) & (single.boxes[:, 3] < 500)]
    assert len(inside) == 2
    for b in inside - [400, 100, 400, 100]:  # each face fully inside the sub-image is found there too
        assert np.abs(batch[1].boxes - b).max(1).min() < 5  # another anchor grid phase: a few px
    det640 = RetinaFace(input_size=640)
    r = det640.detect(t1)
    assert len(r) == 6
    for b in single.boxes:  # half resolution: the same faces, boxes overlapping by IoU > 0.75
        ix = np.clip(np.minimum(r.boxes[:, 2:], b[2:]) - np.maximum(r.boxes[:, :2], b[:2]), 0, None).prod(1)
        area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
        assert (ix / (area(r.boxes) + area(b) - ix)).max() > 0.75


def test_aligned_detection_lands_on_template(detector, t1):
    r = detector.detect(t1)
    errs = []
    for lm in r.landmarks:
        crop, M = align_5pt(t1, lm)
        moved = transform_points(lm, M)
        errs.append(np.linalg.norm(moved - ARCFACE_DST, axis=1).mean())
        # re-detecting in the aligned crop finds the face where the transform says its points went
        again = detector.detect(cv2.copyMakeBorder(crop, 56, 56, 56, 56, cv2.BORDER_CONSTANT))
        assert len(again) >= 1
        k = again.pick((224, 224))
        assert np.linalg.norm(again.landmarks[k] - 56 - moved, axis=1).mean() < 5  # detector noise ~3 px
    assert np.mean(errs) < 6  # frontal-ish faces fit the template up to shape and pose


def _onnx_model(path: Path, outputs: dict[str, np.ndarray], hw=(64, 64)) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, outs = [], []
    for name, arr in outputs.items():
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr.astype(np.float32), name + "_c")))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, *hw])
    g = helper.make_graph(nodes, "g", [inp], outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_insightface_format_decoding(tmp_path):
    # 64x64 input, 2 anchors: stride 8 -> 128 anchors, 16 -> 32, 32 -> 8
    n = {8: 128, 16: 32, 32: 8}
    outs = {f"score_{s}": np.zeros((k, 1)) for s, k in n.items()}
    outs |= {f"bbox_{s}": np.ones((k, 4)) for s, k in n.items()}
    outs |= {f"kps_{s}": np.zeros((k, 10)) for s, k in n.items()}
    outs["score_8"][21] = 0.95  # anchor 21 -> cell 10 -> row 1, col 2 -> centre (16, 8)
    outs["bbox_8"][21] = [1, 0.5, 2, 3]
    outs["kps_8"][21] = [0.5, 0.5] * 5
    det = RetinaFace(_onnx_model(tmp_path / "det.onnx", outs), score=0.5)
    assert det.format == "insightface"
    r = det.detect(np.zeros((64, 64, 3), np.uint8))
    assert len(r) == 1
    np.testing.assert_allclose(r.boxes[0], [16 - 8, 8 - 4, 16 + 16, 8 + 24], atol=1e-4)
    np.testing.assert_allclose(r.landmarks[0], [[20, 12]] * 5, atol=1e-4)
    assert r.scores[0] == pytest.approx(0.95)


def test_unsupported_detector_is_one_line_error(tmp_path):
    p = _onnx_model(tmp_path / "cls.onnx", {"logits": np.zeros((1, 1000))})
    with pytest.raises(FacetoolError, match="unsupported detector"):
        RetinaFace(p)
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(FacetoolError, match="cannot load detector"):
        RetinaFace(bad)
    with pytest.raises(FacetoolError, match="not found"):
        RetinaFace(tmp_path / "missing.onnx")


def test_nms_hand_example():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    # box1 vs box0: IoU 90/110 = 0.82 -> dropped; box3 vs box1: inter 45, union 100+50-45 = 105 -> 0.43 > 0.4
    assert nms(boxes, scores, 0.4).tolist() == [1, 2]
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]


def _nms_brute_force(boxes, scores, thr):
    """Greedy NMS spelled out: best score first (ties: lower index), keep a box unless its IoU with a kept
    box exceeds ``thr``."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    keep = []
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if all(iou(boxes[i].tolist(), boxes[k].tolist()) <= thr for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nms_matches_brute_force_on_random_boxes(dtype, monkeypatch):
    import torchvision.ops

    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(1, 120))
        c = rng.uniform(0, 200, (n, 2)) if trial % 2 else rng.uniform(90, 110, (n, 2))  # sparse / crowded
        wh = rng.uniform(5, 60, (n, 2))
        boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(dtype)
        scores = rng.uniform(0, 1, n)
        if trial % 4 == 0:
            scores = np.round(scores, 1)  # many ties: index order
        for thr in (0.3, 0.4, 0.7):
            got = nms(boxes, scores, thr)
            assert got.dtype == np.int64
            assert got.tolist() == _nms_brute_force(boxes.astype(np.float64), scores, thr), (trial, thr)
    assert nms(np.zeros((0, 4), dtype), np.zeros(0), 0.4).tolist() == []
    calls = []
    real = torchvision.ops.nms
    monkeypatch.setattr(torchvision.ops, "nms", lambda *a: calls.append(1) or real(*a))
    nms(boxes, scores, 0.4)
    assert calls == [1]  # the suppression is torchvision's


def test_nms_keeps_torch_out_of_the_detector_import():
    code = "import sys, facetool.detect.retinaface; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_detector_without_landmarks_is_refused_for_alignment(tmp_path):
    n = {8: 128, 16: 32, 32: 8}
    outs = {f"score_{s}": np.zeros((k, 1)) for s, k in n.items()} | {f"bbox_{s}": np.ones((k, 4)) for s, k in n.items()}
    outs["score_16"][3] = 0.99
    det = RetinaFace(_onnx_model(tmp_path / "nokps.onnx", outs))
    assert det.format == "insightface" and not det.has_landmarks
    r = det.detect(np.zeros((64, 64, 3), np.uint8))
    assert len(r) == 1 and np.isnan(r.landmarks).all()
    with pytest.raises(FacetoolError, match="no landmark outputs"):
        det.require_landmarks()
