"""LFW-family verification: .bin packs (incl. Python-2 pickles), the 10-fold protocol, pairs.txt, safety."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetool.errors import FacetoolError
from facetool.eval import verification as V
from facetool.io import run_name
from facetool.models import create_model, save_checkpoint
from fixtures_ijb import MeanColour, write_bin

RED, GREEN, CYAN = (255, 0, 0), (0, 255, 0), (0, 255, 255)  # normalised: (1,-1,-1), (-1,1,-1), (-1,1,1)


def _png(rgb, size=112) -> bytes:
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = rgb
    return cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()


def _pack(bad_folds=(0, 1), folds=10, per_fold=6):
    """Per fold: 3 genuine (same colour: distance 0) and 3 impostor pairs (red vs green: distance 8/3).
    In ``bad_folds`` one genuine pair is red vs cyan (opposite directions: distance 4, always rejected)."""
    bins, issame = [], []
    for f in range(folds):
        for j in range(per_fold):
            genuine = j < per_fold // 2
            if genuine:
                pair = (RED, CYAN) if (f in bad_folds and j == 0) else (GREEN, GREEN)
            else:
                pair = (RED, GREEN)
            bins += [_png(pair[0]), _png(pair[1], size=120 if j == 1 else 112)]  # one needs resizing
            issame.append(genuine)
    return bins, issame


def test_kfold_protocol_by_hand():
    dist = np.array([0.0, 0.5, 3.0, 3.5] * 5)  # genuine, genuine, impostor, impostor ...
    issame = np.array([True, True, False, False] * 5)
    r = V.kfold_accuracy(dist, issame, folds=2)
    # the first threshold separating everything is 0.51 (pred = dist < thr)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0 and r["fold_thresholds"] == [0.51, 0.51]
    assert r["best_threshold"] == 0.51 and r["best_threshold_accuracy"] == 1.0


@pytest.mark.parametrize("py2", [False, True])
def test_bin_round_trip_gives_the_expected_accuracy(tmp_path, py2):
    bins, issame = _pack()
    path = write_bin(tmp_path / "lfw.bin", bins, issame, py2=py2)
    images, same = V.load_bin(path)
    assert len(images) == 120 and same.tolist() == issame
    assert images[2].shape == (112, 112, 3) and images[3].shape == (112, 112, 3)  # resized 120 -> 112
    assert images[0][0, 0].tolist() == list(RED) and images[1][0, 0].tolist() == list(CYAN)  # BGR -> RGB
    r = V.verify_bin(MeanColour(), path, batch_size=32)
    # folds 0 and 1 lose one genuine pair of 6; the threshold (first best on 9 folds) is 0.01
    fold = np.array([5 / 6, 5 / 6] + [1.0] * 8)
    assert r["fold_accuracies"] == pytest.approx(fold.tolist())
    assert r["accuracy"] == pytest.approx(fold.mean()) and r["std"] == pytest.approx(fold.std())
    assert r["fold_thresholds"] == [0.01] * 10 and r["pairs"] == 60 and r["genuine_pairs"] == 30
    assert r["xnorm"] == pytest.approx(3**0.5, rel=1e-5)  # |(±1, ±1, ±1)|


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_loader_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(marker)], [True]), protocol=2))
    with pytest.raises(FacetoolError, match="which facetool refuses"):
        V.load_bin(path)
    assert not marker.exists()


def test_bin_structure_errors(tmp_path):
    p = write_bin(tmp_path / "odd.bin", [_png(RED)] * 3, [True])
    with pytest.raises(FacetoolError, match="3 images for 1 pairs"):
        V.load_bin(p)
    p = write_bin(tmp_path / "junk.bin", [b"not an image", b"x"], [True])
    images, _ = V.load_bin(p)
    with pytest.raises(FacetoolError, match="image 0 is not a decodable"):
        images[0]
    with pytest.raises(FacetoolError, match=r"^\S*junk.bin: image 0 is not a decodable JPEG/PNG$"):
        V.verify_bin(MeanColour(), p, workers=1)  # raised in a DataLoader worker: still one clean line
    with pytest.raises(FacetoolError, match="not found"):
        V.load_bin(tmp_path / "missing.bin")


def _lfw_tree(root: Path) -> Path:
    """2 folds x (1 matched + 1 mismatched) with solid-colour 'aligned' images."""
    colours = {"Ann_A": GREEN, "Bob_B": RED, "Cid_C": GREEN}
    for name, c in colours.items():
        (root / name).mkdir(parents=True)
        for k in (1, 2):
            cv2.imwrite(str(root / name / f"{name}_{k:04d}.jpg"), cv2.cvtColor(
                np.full((112, 112, 3), c, np.uint8), cv2.COLOR_RGB2BGR))
    pairs = root / "pairs.txt"
    pairs.write_text("2\t1\nAnn_A\t1\t2\nBob_B\t1\tCid_C\t2\nBob_B\t1\t2\nAnn_A\t2\tBob_B\t1\n")
    return pairs


def test_pairs_txt_parsing_and_errors(tmp_path):
    pairs = _lfw_tree(tmp_path / "lfw")
    files, issame, folds = V.read_pairs(pairs, tmp_path / "lfw")
    assert folds == 2 and issame.tolist() == [True, False, True, False]
    assert [Path(f).name for f in files[:4]] == ["Ann_A_0001.jpg", "Ann_A_0002.jpg", "Bob_B_0001.jpg", "Cid_C_0002.jpg"]
    (tmp_path / "lfw" / "Cid_C" / "Cid_C_0002.jpg").unlink()
    with pytest.raises(FacetoolError, match="1 image.* missing, e.g. .*Cid_C_0002.jpg"):
        V.read_pairs(pairs, tmp_path / "lfw")
    bad = tmp_path / "bad.txt"
    bad.write_text("10\t300\nAnn_A\t1\n")
    with pytest.raises(FacetoolError, match="line 2"):
        V.read_pairs(bad, tmp_path / "lfw")


@pytest.mark.slow
def test_cli_bin_and_pairs(tmp_path, cli):
    model = save_checkpoint(tmp_path / "mc.pt", create_model("test_mean_colour"))
    bins, issame = _pack(bad_folds=(3,))
    b = write_bin(tmp_path / "agedb_30.bin", bins, issame)
    r = cli("eval", "agedb-30", "--bin", b, "--model", model, "--out", tmp_path / "o", "--workers", "0")
    assert r.exit_code == 0, r.output
    stem = run_name(model)  # results are named after the run: <folder>_<file>
    res = json.loads((tmp_path / "o" / f"{stem}.json").read_text())
    assert res["accuracy"] == pytest.approx((9 + 5 / 6) / 10) and res["set"] == "agedb-30"
    assert (tmp_path / "o" / f"{stem}_roc.png").exists() and "±" in r.output

    pairs = _lfw_tree(tmp_path / "lfw")
    r = cli("eval", "lfw", "--pairs", pairs, "--images", tmp_path / "lfw", "--aligned", "--model", model,
            "--out", tmp_path / "o2", "--workers", "0")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o2" / f"{stem}.json").read_text())
    assert res["accuracy"] == 1.0 and res["pairs"] == 4

    r = cli("eval", "lfw", "--model", model)
    assert r.exit_code != 0 and "either --bin" in r.output
