"""`facetool train resnet|aig|iig` end to end on a synthetic store, their errors, learning and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import learning_seeds

from facetool.models import load_model

SMALL = ["--arch", "resnet18", "--width", "8", "--input-size", "64", "--batch-size", "16", "--lr", "0.05"]


def _ok(res):
    assert res.exit_code == 0, res.output
    return res


def _fails(res, *needles):
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in res.output, res.output
    return res


@pytest.mark.slow
def test_train_resnet_and_resume(cli, synthetic_store, tmp_path):
    out = tmp_path / "r"
    _ok(cli("train", "resnet", "--store", synthetic_store, "--out", out, "--epochs", "2", "--max-steps", "3", *SMALL))
    assert not (out / "model.pt").exists() or json.loads((out / "result.json").read_text())["metrics"] == {}
    res = _ok(cli("train", "resnet", "--store", synthetic_store, "--out", out, "--epochs", "2", "--resume", *SMALL))
    assert "val_top1" in res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 10  # 80 train images / 16
    model = load_model(out / "model.pt")
    assert model.config["name"] == "resnet18" and model.config["num_classes"] == 8
    result = json.loads((out / "result.json").read_text())
    assert result["gflops"] > 0 and result["gated_blocks"] == 0 and result["metrics"]["epoch"] == 2


@pytest.mark.slow
def test_train_iig_writes_masks_into_meta(cli, synthetic_store, tmp_path):
    out = tmp_path / "iig"
    _ok(cli("train", "iig", "--store", synthetic_store, "--out", out, "--epochs", "1", "--feature", "gender,age",
            "--blocks-per-value", "1", "--mask-style", "contiguous", "--with-target", *SMALL, "--arch", "resnet34"))
    model = load_model(out / "model.pt")
    assert model.config["name"] == "aig_resnet34"
    assert model.meta["masks"] == {"gender": {"female": [3], "male": [4]},
                                   "age": {"0-20": [5], "20-40": [6], "40-60": [7], "60+": [8]}}
    assert model.meta["vocab"]["gender"] == ["female", "male"] and model.meta["method"] == "iig"
    result = json.loads((out / "result.json").read_text())
    assert "val_acc_gender" in result["metrics"] and "exec_gflops" in result


def test_train_errors_are_one_line(cli, synthetic_store, tmp_path):
    base = ["--store", synthetic_store, "--epochs", "1", *SMALL]
    _fails(cli("train", "iig", *base, "--out", tmp_path / "a", "--feature", "hat"), "no attribute 'hat'")
    _fails(cli("train", "aig", *base, "--out", tmp_path / "b", "--target", "1.5"), "[0, 1]")
    _fails(cli("train", "aig", *base, "--out", tmp_path / "b", "--target-schedule", "1,0.5"), "2 values", "8 gated")
    masks = tmp_path / "m.json"
    masks.write_text(json.dumps({"gender": {"female": [2, 3], "male": [3, 4]}}))
    _fails(cli("train", "iig", *base, "--out", tmp_path / "c", "--feature", "gender", "--masks", masks),
           "block 3 is in both")
    _fails(cli("train", "resnet", *base, "--out", tmp_path / "d", "--arch", "vgg16"), "unknown --arch")
    _fails(cli("train", "resnet", "--store", tmp_path / "none.h5", "--out", tmp_path / "e"), "not found")
    _fails(cli("train", "resnet", *base, "--out", tmp_path / "f", "--lr", "1e30", "--no-flip"), "--lr must be in (0, 100]")


@pytest.fixture(scope="module")
def learning_store(tmp_path_factory) -> Path:
    """16 identities x 30 images at 64 px (24 train / 6 test each)."""
    from facetool.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("learn") / "faces64.h5"
    prepare_synthetic(out, identities=16, per_identity=30, size=64, seed=1)
    return out


def _mean(xs) -> float:
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_aig_learns_to_hit_its_target(cli, learning_store, tmp_path):
    """AIG at --target 0.4, averaged over learning_seeds(2) (model init + data order).
    Measured (free-block rate, top-1, executed/dense GFLOPs; means of 2 seeds):
    not measured to the end with two seeds (the machine was overloaded). Seed 0, validation free-block
    rate per epoch: 0.006, 0.17, 0.42, 0.48, 0.47, 0.48 (epochs 1-6; the gates start ~0.87 open), top-1
    0.57 at epoch 6; seed 200: 0.00, 0.04, 0.29 (epochs 1-3). The rate settles a little above the
    target, so the band is 0.15 (0.1 left seed 0 only ~0.02 inside). Re-measure with seeds 100/200."""
    rates, top1, ratio = [], [], []
    for seed in learning_seeds(2):
        out = tmp_path / f"aig{seed}"
        _ok(cli("train", "aig", "--store", learning_store, "--out", out, "--arch", "resnet18", "--width", "16",
                "--epochs", "8", "--batch-size", "32", "--lr", "0.1", "--warmup-epochs", "0.5", "--target", "0.4",
                "--seed", str(seed)))
        result = json.loads((out / "result.json").read_text())
        rates.append(result["metrics"]["val_exec_rate_free"])
        top1.append(result["metrics"]["val_top1"])
        ratio.append(result["exec_gflops"] / result["gflops"])
    print(f"[measured] aig seeds {learning_seeds(2)}: free rate {rates} top1 {top1} flops ratio {ratio}")
    assert abs(_mean(rates) - 0.4) < 0.15, rates  # the free blocks run near the target rate
    assert _mean(top1) > 0.4, top1  # chance: 1/16
    assert _mean(ratio) < 0.85, ratio  # skipped blocks save compute


@pytest.mark.slow
def test_iig_gates_reveal_gender(cli, learning_store, tmp_path):
    """ConvNet-IIG gender masks: Eq. 5 reads gender from the gates, averaged over learning_seeds(2).
    Chance: 0.5, s.e. 0.036 for the mean of 2 x 96 test images; threshold 0.65 = chance + 4 s.e.
    Measured: seed 0 alone 0.77 (before averaging); the 2-seed means are not measured yet (overloaded machine)."""
    acc = []
    for seed in learning_seeds(2):
        out = tmp_path / f"iig{seed}"
        _ok(cli("train", "iig", "--store", learning_store, "--out", out, "--arch", "resnet18", "--width", "16",
                "--feature", "gender", "--blocks-per-value", "2", "--epochs", "16", "--batch-size", "32",
                "--lr", "0.3", "--warmup-epochs", "0.5", "--seed", str(seed)))
        acc.append(json.loads((out / "result.json").read_text())["metrics"]["val_acc_gender"])
    print(f"[measured] iig seeds {learning_seeds(2)}: gender accuracy {acc}")
    assert _mean(acc) > 0.65, acc


@pytest.mark.slow
def test_torchrun_two_processes_gloo(synthetic_store, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).parent / "facetool"  # the console script torchrun starts twice
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "train", "aig", "--store", str(synthetic_store), "--out", str(out), "--epochs", "1", *SMALL]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    st = torch.load(out / "last.pt", weights_only=True)
    assert len(st["rng"]) == 2 and st["step"] == 2  # 80 images / 2 ranks / 16 per batch, drop_last
    assert load_model(out / "model.pt").meta["epochs_done"] == 1
