"""`facetool eval classify`: top-1/top-5 vs hand-computed values, executed vs dense GFLOPs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facetool.errors import FacetoolError
from facetool.eval.classification import evaluate_classifier, predict
from facetool.models import FaceModel, create_model, register_model, save_checkpoint
from facetool.store import Record, StoreWriter

N_IDS = 6


class TableClassifier(FaceModel):
    """Logits of an image = row ``k`` of a fixed table, ``k`` = the red value of its top-left pixel.
    A zero 1x1 conv 3->C adds exactly 0 and 2*3*C*H*W FLOPs, so FLOPs are known by hand."""

    def __init__(self, table: list[list[float]] | None = None, num_classes: int = N_IDS, input_size: int = 16) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(table or [[0.0] * num_classes], dtype=torch.float32))
        self.conv = nn.Conv2d(3, num_classes, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward_features(self, x, internals=None):
        k = (x[:, 0, 0, 0] * 127.5 + 127.5).round().long().clamp(0, len(self.table) - 1)
        return self.table[k] + self.conv(x).mean((2, 3))

    def forward_head(self, f):
        return f


@register_model("test_table_classifier")
def _table(**kw):
    return TableClassifier(**kw)


def ranked(first: list[int]) -> list[float]:
    """Logits where the classes in ``first`` come first, in that order, then the rest."""
    order = first + [c for c in range(N_IDS) if c not in first]
    out = [0.0] * N_IDS
    for r, c in enumerate(order):
        out[c] = float(N_IDS - r)
    return out


def make_store(path: Path, size: int = 16, per_id: int = 2) -> Path:
    """N_IDS identities x per_id images; the red value of pixel (0, 0) is the store row; odd rows test."""
    w = StoreWriter(path, image_size=(size, size), identities=[f"id{k}" for k in range(N_IDS)])
    rng = np.random.default_rng(1)
    row = 0
    for k in range(N_IDS):
        for i in range(per_id):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            img[0, 0, 0] = row
            w.append(Record(image=img, label=k, split=row % 2, source=f"id{k}/{i}.jpg"))
            row += 1
    w.finalize()
    return path


# test rows 1,3,5,7,9,11 have labels 0..5; the true class is ranked 1st, 2nd, 1st, 6th, 5th, 1st
TRUE_RANK = {1: 0, 3: 1, 5: 0, 7: 5, 9: 4, 11: 0}  # -> top-1 3/6, top-5 5/6


def table_model(size: int = 16) -> TableClassifier:
    table = []
    for row in range(2 * N_IDS):
        label = row // 2
        r = TRUE_RANK.get(row, 0)  # training rows: always right
        others = [c for c in range(N_IDS) if c != label]
        table.append(ranked(others[:r] + [label]))
    return create_model("test_table_classifier", table=table, num_classes=N_IDS, input_size=size)


def test_top1_top5_and_flops_match_hand_computation(tmp_path):
    store = make_store(tmp_path / "s.h5")
    m = table_model()
    res = evaluate_classifier(m, store, "test", batch_size=4)
    assert res["images"] == 6
    assert res["top1"] == pytest.approx(100 * 3 / 6)
    assert res["top5"] == pytest.approx(100 * 5 / 6)
    assert res["gflops_dense"] == pytest.approx(2 * 3 * N_IDS * 16 * 16 / 1e9)  # the 1x1 conv
    assert res["gflops_executed"] == res["gflops_dense"] and res["gate_rate"] is None
    assert res["params_m"] == pytest.approx((3 * N_IDS + N_IDS) / 1e6)
    train = evaluate_classifier(m, store, "train", batch_size=5)
    assert train["top1"] == 100.0 and train["images"] == 6
    pred = predict(m, store, "all", batch_size=3)
    assert pred.indices.tolist() == list(range(12)) and pred.topk.shape == (12, 5)


def _set_gates(model: nn.Module, open_blocks: list[bool]) -> None:
    from facetool.trainers.aig import gated_blocks

    with torch.no_grad():
        for b, o in zip(gated_blocks(model), open_blocks):
            b.gate.fc2.weight.zero_()
            b.gate.fc2.bias.copy_(torch.tensor([-5.0, 5.0] if o else [5.0, -5.0]))


def test_executed_flops_dense_when_open_and_lower_when_closed(tmp_path):
    from facetool.flops import gated_block_flops

    store = make_store(tmp_path / "s.h5", size=32)
    torch.manual_seed(0)
    m = create_model("aig_resnet18", num_classes=N_IDS, input_size=32, width=8).eval()
    _set_gates(m, [True] * 8)
    full = evaluate_classifier(m, store, "test", batch_size=4)
    assert full["gate_rate"] == 1.0
    assert full["gflops_executed"] == pytest.approx(full["gflops_dense"], rel=1e-12)
    # the same numbers as a direct forward pass
    x = (torch.from_numpy(__import__("h5py").File(store)["images"][1::2]).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        top = m(x).topk(5, 1).indices
    labels = torch.arange(N_IDS)
    assert full["top1"] == pytest.approx(100 * (top[:, 0] == labels).float().mean().item())
    assert full["top5"] == pytest.approx(100 * (top == labels[:, None]).any(1).float().mean().item())
    closed = [True, True, False, True, False, False, True, True]
    _set_gates(m, closed)
    part = evaluate_classifier(m, store, "test", batch_size=4)
    assert part["gate_rate"] == pytest.approx(5 / 8)
    assert part["gate_rate_per_block"] == [float(o) for o in closed]
    blocks = gated_block_flops(m, 32)
    skipped = sum(float(f) for f, o in zip(blocks, closed) if not o)
    assert part["gflops_executed"] == pytest.approx(part["gflops_dense"] - skipped / 1e9, rel=1e-9)
    assert part["gflops_executed"] < 0.9 * part["gflops_dense"]
    assert part["gate_rate_free"] is None  # no training targets in this model's meta: free blocks unknown
    # with the targets `train aig --target 0.4` records (first 2 and last block pinned to 1), the free
    # blocks are 2..6: open pattern F T F F T -> 2/5, beside the overall 5/8
    m.meta = {"method": "aig", "aig": {"targets": [1.0, 1.0, 0.4, 0.4, 0.4, 0.4, 0.4, 1.0], "weight": 1.0}}
    part = evaluate_classifier(m, store, "test", batch_size=4)
    assert part["gate_rate"] == pytest.approx(5 / 8)
    assert part["gate_rate_free"] == pytest.approx(2 / 5) and part["target_free"] == pytest.approx(0.4)
    m.meta = {"method": "iig", "iig": {"targets": None}}  # IIG without --with-target: no free blocks
    assert evaluate_classifier(m, store, "test", batch_size=4)["gate_rate_free"] is None


def test_cli_two_models_side_by_side_and_json(tmp_path, cli, monkeypatch):
    import re

    from facetool.cli.common import console

    monkeypatch.setattr(console, "width", 200)  # the whole table on one line per row
    store = make_store(tmp_path / "s.h5", size=32)
    save_checkpoint(tmp_path / "a.pt", table_model(32))
    torch.manual_seed(0)
    aig = create_model("aig_resnet18", num_classes=N_IDS, input_size=32, width=8)
    _set_gates(aig, [True, True, False, True, False, False, True, True])
    targets = [1.0, 1.0] + [0.4] * 5 + [1.0]  # what `train aig --target 0.4` stores for ResNet-18
    save_checkpoint(tmp_path / "b.pt", aig, meta={"method": "aig", "aig": {"targets": targets, "weight": 1.0}})
    r = cli("eval", "classify", "--store", store, "--model", tmp_path / "a.pt", "--model", tmp_path / "b.pt",
            "--json", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    assert "classification on s.h5" in r.output and "t.json" in r.output
    assert re.search(r"gate rate\s*┃\s*free-block rate\s*┃\s*target", r.output), r.output
    assert re.search(r"│\s*0\.625\s*│\s*0\.4\s*│\s*0\.4\s*│", r.output), r.output  # all, free, target
    rows = json.loads((tmp_path / "t.json").read_text())["models"]
    assert [Path(x["checkpoint"]).name for x in rows] == ["a.pt", "b.pt"]
    assert [x["model"] for x in rows] == ["test_table_classifier", "aig_resnet18"]
    assert rows[0]["top1"] == pytest.approx(50.0) and rows[0]["gate_rate"] is None
    assert rows[1]["gate_rate"] == pytest.approx(5 / 8) and rows[1]["gflops_executed"] < rows[1]["gflops_dense"]
    assert rows[1]["gate_rate_free"] == pytest.approx(2 / 5) and rows[1]["target_free"] == pytest.approx(0.4)
    assert rows[0]["gate_rate_free"] is None  # not gated


def test_bad_inputs_give_one_line(tmp_path, cli):
    store = make_store(tmp_path / "s.h5", size=32)
    m = create_model("resnet18", num_classes=N_IDS, input_size=32, width=8)
    sd_path = tmp_path / "wrong_arch.pt"
    ck = {"format": "facetool-checkpoint", "version": 1, "state_dict": m.state_dict(), "meta": {},
          "config": {"name": "aig_resnet18", "num_classes": N_IDS, "input_size": 32, "width": 8}}
    torch.save(ck, sd_path)
    r = cli("eval", "classify", "--store", store, "--model", sd_path)
    assert r.exit_code != 0 and "missing keys" in r.output and "gate" in r.output
    assert len(r.output.strip().splitlines()) == 1
    save_checkpoint(tmp_path / "ten.pt", create_model("resnet18", num_classes=10, input_size=32, width=8))
    r = cli("eval", "classify", "--store", store, "--model", tmp_path / "ten.pt")
    assert r.exit_code != 0 and "10 classes" in r.output
    r = cli("eval", "classify", "--store", store, "--model", tmp_path / "nope.pt")
    assert r.exit_code != 0 and "not found" in r.output
    r = cli("eval", "classify", "--store", tmp_path / "nope.h5", "--model", sd_path)
    assert r.exit_code != 0 and "not found" in r.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = cli("eval", "classify", "--store", store, "--model", tmp_path / "junk.pt")
    assert r.exit_code != 0 and "junk.pt" in r.output and len(r.output.strip().splitlines()) == 1
    with pytest.raises(FacetoolError, match="split"):
        evaluate_classifier(m, store, "val")


def test_table2_recipe_steps_parse_as_facetool_commands():
    """Every step of recipes/imdbface_table2.toml names an existing command with valid options."""
    import typer

    from facetool.cli import app
    from facetool.recipe import load_recipe

    title, steps = load_recipe(Path(__file__).parents[1] / "recipes" / "imdbface_table2.toml")
    assert "Table II" in title
    root = typer.main.get_command(app)
    used = []
    for step in steps:
        cmd, args, path = root, list(step.argv), []
        while hasattr(cmd, "get_command"):  # a group (typer vendors its own click)
            sub = cmd.get_command(cmd.context_class(cmd), args[0])
            assert sub is not None, f"step {step.name!r}: no command {' '.join(path + args[:1])}"
            path.append(args.pop(0))
            cmd = sub
        ctx = cmd.make_context(" ".join(path), args)  # raises on unknown options / bad values
        used.append(" ".join(path))
        if path == ["eval", "classify"]:
            assert len(ctx.params["model"]) == 6
    assert used.count("train aig") == 3 and used.count("train iig") == 2 and "prepare imdb-face" in used
