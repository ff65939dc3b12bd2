"""`facetool dissect gates`: per-attribute gate fractions, easy/hard images and correct-vs-wrong
statistics against hand counts, with a model whose gates and predictions are fixed per image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from facetool.explainers.dissect import active_gate_stats, easy_hard_images, gate_fractions_by_attribute
from facetool.models import FaceModel, create_model, register_model, save_checkpoint
from facetool.store import Record, StoreWriter

# row: (identity, gates); identity 0 female, 1 male
GATES = [[1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]]
CORRECT = [True, True, False, False, True, False, False, True]
GLASSES = ["none", "glasses", None, "none", "glasses", "glasses", "none", None]


class TableGated(FaceModel):
    """Gates and logits of an image = rows ``k`` of fixed tables, ``k`` = red value of pixel (0, 0)."""

    internal_names = ("gates",)

    def __init__(self, gates: list[list[float]] | None = None, logits: list[list[float]] | None = None,
                 num_classes: int = 2, input_size: int = 16) -> None:
        super().__init__()
        self.register_buffer("gates", torch.tensor(gates or [[0.0]], dtype=torch.float32))
        self.register_buffer("logits", torch.tensor(logits or [[0.0] * num_classes], dtype=torch.float32))

    def forward_features(self, x, internals=None):
        k = (x[:, 0, 0, 0] * 127.5 + 127.5).round().long().clamp(0, len(self.gates) - 1)
        if internals is not None:
            internals["gates"] = self.gates[k]
        return self.logits[k]

    def forward_head(self, f):
        return f


@register_model("test_table_gated")
def _tg(**kw):
    return TableGated(**kw)


def make_store(path: Path) -> Path:
    w = StoreWriter(path, image_size=(16, 16), identities=["alice", "bob"],
                    attribute_values={"glasses": ["none", "glasses"]},
                    identity_attributes={"gender": (["female", "male"], [0, 1])})
    for row in range(8):
        img = np.full((16, 16, 3), 40 * (row % 4) + 30, np.uint8)
        img[0, 0, 0] = row
        g = GLASSES[row]
        w.append(Record(image=img, label=row // 4, split=1, source=f"{row}.jpg",
                        attributes={"glasses": ["none", "glasses"].index(g)} if g else None))
    w.finalize()
    return path


def make_model(path: Path) -> Path:
    logits = []
    for row in range(8):
        label = row // 4
        pred = label if CORRECT[row] else 1 - label
        logits.append([1.0, 0.0] if pred == 0 else [0.0, 1.0])
    m = create_model("test_table_gated", gates=GATES, logits=logits, num_classes=2, input_size=16)
    return save_checkpoint(path, m)


def test_library_functions_match_hand_counts():
    g = np.array(GATES)
    df = gate_fractions_by_attribute(g, np.array([0, 0, 0, 0, 1, 1, 1, 1]), ["female", "male"])
    assert df.loc["female"].tolist() == [4, 0.75, 0.25, 0.5]
    assert df.loc["male"].tolist() == [4, 0.75, 1.0, 0.75]
    st = active_gate_stats(g, np.array(CORRECT))
    assert st["correct"] == {"images": 4, "mean": 2.5, "std": 0.5, "min": 2.0, "max": 3.0}
    assert st["wrong"] == {"images": 4, "mean": 1.5, "std": 0.5, "min": 1.0, "max": 2.0}
    picks = easy_hard_images(g, np.array([0] * 4 + [1] * 4), np.arange(8), per_identity=2)
    assert picks[0] == {"easy": [(2, 1), (3, 1)], "hard": [(1, 2), (0, 2)]}
    assert picks[1] == {"easy": [(5, 2), (6, 2)], "hard": [(7, 3), (4, 3)]}


def test_cli_writes_heatmaps_csvs_grids_and_curves(tmp_path, cli):
    store, ck = make_store(tmp_path / "s.h5"), make_model(tmp_path / "m.pt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train_loss,train_top1,val_top1,val_top5\n1,2.0,0.3,0.25,0.6\n2,1.0,0.6,0.5,0.9\n")
    out = tmp_path / "d"
    r = cli("dissect", "gates", "--model", ck, "--store", store, "--out", out, "--split", "all",
            "--run", run, "--per-identity", "2")
    assert r.exit_code == 0, r.output
    gender = pd.read_csv(out / "gates_gender.csv", index_col=0)
    assert gender.loc["female"].tolist() == [4, 0.75, 0.25, 0.5]
    assert gender.loc["male"].tolist() == [4, 0.75, 1.0, 0.75]
    glasses = pd.read_csv(out / "gates_glasses.csv", index_col=0)  # unknown rows 2 and 7 left out
    assert glasses.loc["none"].tolist() == pytest.approx([3, 1 / 3, 1 / 3, 1.0])
    assert glasses.loc["glasses"].tolist() == pytest.approx([3, 1.0, 1.0, 1 / 3])
    stats = json.loads((out / "gate_stats.json").read_text())
    assert stats["correct"]["mean"] == 2.5 and stats["wrong"]["mean"] == 1.5
    assert pd.read_csv(out / "gate_stats.csv", index_col=0).loc["wrong", "std"] == 0.5
    eh = json.loads((out / "easy_hard.json").read_text())
    assert eh["alice"]["easy"] == [[2, 1], [3, 1]] and eh["bob"]["hard"] == [[7, 3], [4, 3]]
    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.columns) == ["epoch", "train_top1", "val_top1", "val_top5"] and len(curves) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top1"] == 50.0 and summary["attributes"]["gender"]["most_selective_block"] == 1
    for png in ("gates_gender.png", "gates_glasses.png", "easy_hard.png", "active_gates.png", "curves.png"):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[0] > 50 and img.shape[1] > 50, png
    assert not list(out.glob(".*.tmp"))


def test_bad_inputs_give_one_line(tmp_path, cli):
    store, ck = make_store(tmp_path / "s.h5"), make_model(tmp_path / "m.pt")

    def fails(*args: str, match: str) -> None:
        r = cli("dissect", "gates", *args)
        assert r.exit_code != 0 and match in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1

    fails("--model", ck, "--store", store, "--out", tmp_path / "o", "--attributes", "age", match="no attribute 'age'")
    fails("--model", tmp_path / "x.pt", "--store", store, "--out", tmp_path / "o", match="not found")
    fails("--model", ck, "--store", tmp_path / "x.h5", "--out", tmp_path / "o", match="not found")
    fails("--model", ck, "--store", store, "--out", tmp_path / "o", "--run", tmp_path, match="metrics")
    plain = save_checkpoint(tmp_path / "r.pt", create_model("resnet18", num_classes=2, input_size=32, width=8))
    fails("--model", plain, "--store", store, "--out", tmp_path / "o", match="no gates")
    fails("--model", ck, "--store", store, "--out", tmp_path / "o", "--device", "tpu", match="--device")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
