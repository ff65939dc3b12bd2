"""`train fan` / `eval landmarks`: heatmap targets and flips, the adaptive wing loss, the landmark metrics,
and the commands end to end in subprocesses (on files a previous command wrote)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_facetool


@pytest.fixture(scope="module")
def landmark_store(tmp_path_factory):
    """A tiny synthetic store with iBUG 68 landmarks (64 px, 3 identities x 4 images)."""
    from facetool.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("fanstore") / "lm.h5"
    prepare_synthetic(out, identities=3, per_identity=4, size=64, seed=0)
    return out


def test_gaussian_targets_decode_back_to_the_points(landmark_store):
    """A Gaussian target peaks (value 1) at its point's cell; decoding it (public decoding) is within 0.75
    cells (3 input px: half a cell of argmax quantisation + 0.25 refinement) of every point inside the crop."""
    from facetool.data.heatmaps import LandmarkDataset, gaussian_heatmaps
    from facetool.models.fan import heatmaps_to_landmarks

    g = gaussian_heatmaps(torch.tensor([[3.0, 5.0]]), 8, 1.0)
    assert g.shape == (1, 8, 8) and g[0, 5, 3] == 1.0 and math.isclose(float(g[0, 5, 4]), math.exp(-0.5), rel_tol=1e-6)
    ds = LandmarkDataset(landmark_store, "train", size=64, sigma=1.0)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and 0 <= item["image"].min() and item["image"].max() <= 1
    pts = item["points"]
    inside = ((pts > 2) & (pts < 62)).all(-1)
    dec = heatmaps_to_landmarks(item["heatmap"][None])[0]
    assert inside.sum() > 50 and float((dec - pts)[inside].abs().max()) <= 3.0


def test_target_peak_scales_the_maps_not_their_decoding(landmark_store):
    """peak 10: every target map is 10 x the peak-1 map (maximum exactly 10 at a whole-cell point), and it decodes
    to the same points; train_fan's default is DEFAULT_PEAK = 10 (peak 1 learns all-zero maps,
    tests/test_fan_learning.py)."""
    import inspect

    from facetool.data.heatmaps import LandmarkDataset, gaussian_heatmaps
    from facetool.models.fan import heatmaps_to_landmarks
    from facetool.trainers.fan import DEFAULT_PEAK, FanMethod, train_fan

    g = gaussian_heatmaps(torch.tensor([[3.0, 5.0]]), 8, 1.0, peak=10.0)
    assert float(g[0, 5, 3]) == 10.0 and math.isclose(float(g[0, 5, 4]), 10 * math.exp(-0.5), rel_tol=1e-6)
    one = LandmarkDataset(landmark_store, "train", size=64)[0]["heatmap"]
    ten = LandmarkDataset(landmark_store, "train", size=64, peak=10.0)[0]["heatmap"]
    assert torch.allclose(ten, 10 * one) and torch.equal(heatmaps_to_landmarks(ten[None]), heatmaps_to_landmarks(one[None]))
    assert DEFAULT_PEAK == 10.0 and inspect.signature(train_fan).parameters["peak"].default == DEFAULT_PEAK
    assert FanMethod().meta()["peak"] == DEFAULT_PEAK


def test_flip_mirrors_points_and_swaps_left_and_right(landmark_store):
    """A flipped item: image mirrored, point i = mirror of point perm[i] (outer eye corners 36 <-> 45)."""
    from facetool.data.heatmaps import LandmarkDataset

    plain = LandmarkDataset(landmark_store, "train", size=64)
    flipped = LandmarkDataset(landmark_store, "train", size=64, flip=True)
    for seed in range(20):  # some seed flips item 0
        torch.manual_seed(seed)
        f = flipped[0]
        if not torch.equal(f["image"], plain[0]["image"]):
            break
    p = plain[0]
    assert torch.equal(f["image"], p["image"].flip(-1))
    assert torch.allclose(f["points"][36], torch.stack((64 - p["points"][45, 0], p["points"][45, 1])))
    assert torch.allclose(f["points"][8], torch.stack((64 - p["points"][8, 0], p["points"][8, 1])))  # chin: itself


def test_awing_loss_known_values():
    """y = 0, |d| = 0.25 < theta: 14 ln(1 + 0.25^2.1) = 0.741731; y = 1, |d| = 0.25: 14 ln(1 + 0.25^1.1) = 2.756777;
    continuous at theta = 0.5; zero at d = 0."""
    from facetool.trainers.fan import awing_loss

    def one(pred, target):
        return float(awing_loss(torch.tensor([pred]), torch.tensor([target])))

    assert math.isclose(one(0.25, 0.0), 14 * math.log(1 + 0.25**2.1), rel_tol=1e-5)
    assert math.isclose(one(0.25, 0.0), 0.741731, rel_tol=1e-4)
    assert math.isclose(one(0.75, 1.0), 2.756777, rel_tol=1e-4)
    assert one(0.0, 0.0) == 0.0
    assert math.isclose(one(0.5 - 1e-6, 0.0), one(0.5 + 1e-6, 0.0), abs_tol=1e-4)


def test_landmark_metrics_known_values():
    """Errors 0.02, 0.05, 0.10: AUC@0.08 = mean(0.06, 0.03, 0) / 0.08 = 0.375; failure rate 1/3. NME: points off
    by (3, 4) = 5 px with eye corners 50 px apart -> 0.1; box 50 x 90 -> 5 / sqrt(4500) = 0.074536."""
    from facetool.eval.landmarks import auc, box_size, failure_rate, inter_ocular, nme

    e = np.array([0.02, 0.05, 0.10])
    assert math.isclose(auc(e), 0.375) and math.isclose(failure_rate(e), 1 / 3)
    gt = np.zeros((1, 3, 2))
    gt[0, 1] = (50, 0)
    gt[0, 2] = (40, 90)
    pred = gt + np.array([3.0, 4.0])
    assert math.isclose(float(nme(pred, gt, inter_ocular(gt, (0, 1)))[0]), 0.1)
    assert math.isclose(float(nme(pred, gt, box_size(gt))[0]), 0.074536, rel_tol=1e-5)


@pytest.mark.slow  # two subprocesses, ~40 s on 2 shared cores
def test_train_fan_then_eval_landmarks(tmp_path, landmark_store):
    run = tmp_path / "fan"
    r = run_facetool("train", "fan", "--store", landmark_store, "--stacks", "1", "--width", "16", "--input-size", "64",
                     "--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--loss", "awing", "--peak", "5", "--out", run)
    assert r.returncode == 0, r.stderr
    from facetool.models import load_model

    m = load_model(run / "model.pt")
    assert type(m).__name__ == "FAN" and m.num_stacks == 1 and m.width == 16 and m.meta["loss"] == "awing"
    assert m.meta["peak"] == 5.0
    ev = tmp_path / "eval"
    r = run_facetool("eval", "landmarks", "--model", run / "model.pt", "--store", landmark_store, "--out", ev)
    assert r.returncode == 0, r.stderr
    res = json.loads((ev / "landmarks.json").read_text())["conventions"]["ibug68"]
    assert res["images"] > 0 and 0 <= res["auc_io"] <= 1 and 0 <= res["failure_io"] <= 1
    assert res["nme_io"] > 0 and res["nme_box"] > 0 and res["mean_shape_nme_io"] > 0
    assert (ev / "overlay.png").read_bytes().startswith(b"\x89PNG")
    assert "NME io" in r.stdout


@pytest.mark.slow  # a 2-stack 256-px FAN in a subprocess, ~35 s on 2 shared cores
def test_eval_landmarks_on_a_public_state_dict(tmp_path, landmark_store):
    """A state_dict written by the test in the public 2DFAN4 layout (no num_batches_tracked), 2 stacks taken
    from it with --arch fan2, scored at 256 px."""
    from test_fan import public_state_dict

    path = tmp_path / "2DFAN4-test.pth.tar"
    torch.save(public_state_dict(4), path)
    r = run_facetool("eval", "landmarks", "--model", path, "--arch", "fan2", "--store", landmark_store,
                     "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ev" / "landmarks.json").read_text())["conventions"]["ibug68"]["images"] > 0


def test_a_fan_file_with_wrong_keys_is_named(tmp_path, landmark_store):
    from test_fan import public_state_dict

    sd = public_state_dict(2)
    sd["l1.extra"] = sd.pop("l1.bias")
    path = tmp_path / "bad.pth.tar"
    torch.save(sd, path)
    r = run_facetool("eval", "landmarks", "--model", path, "--store", landmark_store)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "missing keys: l1.bias" in err and "unexpected keys: l1.extra" in err


def test_train_fan_refuses_a_store_without_dense_landmarks(tmp_path):
    from facetool.data.synthetic import prepare_synthetic

    store = tmp_path / "plain.h5"
    prepare_synthetic(store, identities=2, per_identity=3, size=64, seed=0, landmarks=False)
    r = run_facetool("train", "fan", "--store", store, "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "no dense landmarks" in err
    assert not (tmp_path / "run").exists()
